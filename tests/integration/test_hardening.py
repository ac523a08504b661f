"""Integration: the hardening deviations of docs/COMPATIBILITY.md, real daemon."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest
from helpers import REPO
from helpers.config import write_config
from helpers.daemon import Vhostmd, metrics_of, try_read, wait_for
from vhostmd_wire.disk import read_disk, read_header

pytestmark = pytest.mark.integration
Spawn = Callable[..., Vhostmd]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
ANSWER = [("Answer", "int32", "host", "echo 42")]


# --- item 2: values that do not fit their type -------------------------------------


def test_values_that_do_not_fit_their_type_are_left_out(tmp_path: Path, spawn: Spawn) -> None:
    """abc/empty/-5 for unsigned, 99999999999 for int32, 1.5x for real64: left out, named."""
    disk = tmp_path / "vhostmd0"
    bad = [
        ("Letters", "uint32", "host", "echo abc"),
        ("Empty", "uint64", "host", "true"),
        ("TooBig", "int32", "host", "echo 99999999999"),
        ("Negative", "uint32", "vm", "echo -5"),
        ("Suffix", "real64", "host", "echo 1.5x"),
    ]
    good = [("Fine", "uint64", "host", "echo 7"), ("Real", "real64", "host", "echo 1.5"),
            ("Text", "string", "host", "echo abc")]
    config = write_config(tmp_path / "vhostmd.conf", disk, bad + good)
    daemon = spawn("-d", "-f", str(config), "-c", "test:///default")
    values = metrics_of(wait_for(lambda: try_read(disk), 15, "the first publish"))
    assert values == {("Fine", "host"): "7", ("Real", "host"): "1.5", ("Text", "host"): "abc"}
    assert daemon.stop()[0] == 0
    log = daemon.log()
    for line in ("metric Letters left out: value 'abc' is not a valid uint32",
                 "metric Empty left out: value '' is not a valid uint64",
                 "metric TooBig left out: value '99999999999' is not a valid int32",
                 "metric Negative of VM 'test' (id 1) left out: value '-5' is not a valid uint32",
                 "metric Suffix left out: value '1.5x' is not a valid real64"):
        assert line in log, line


# --- item 3: two daemons, one disk ----------------------------------------------------


def test_second_daemon_on_the_same_disk_refuses_naming_the_first(
    tmp_path: Path, spawn: Spawn
) -> None:
    """Different pid files, same disk: the second exits 1 naming the first's pid; disk untouched."""
    disk = tmp_path / "vhostmd0"
    config = write_config(tmp_path / "a.conf", disk, ANSWER)
    first = spawn("-d", "-p", str(tmp_path / "a.pid"), "-f", str(config), "-c", "test:///default")
    wait_for(lambda: try_read(disk), 15, "the first publish")
    other = write_config(tmp_path / "b.conf", disk, [("Other", "string", "host", "echo other")])
    second = spawn("-d", "-p", str(tmp_path / "b.pid"), "-f", str(other), "-c", "test:///default")
    assert second.proc.wait(15) == 1
    assert f"in use by another vhostmd (pid {first.pid})" in second.log()
    assert second.log().count("in use by another vhostmd") == 1
    assert not (tmp_path / "b.pid").exists()
    for _ in range(3):  # the first keeps its disk to itself: never "Other", never busy
        content = wait_for(lambda: try_read(disk), 5, "a publish")
        assert metrics_of(content) == {("Answer", "host"): "42"}
    assert first.stop()[0] == 0


def test_qemu_like_ofd_lock_does_not_stop_the_daemon(tmp_path: Path, spawn: Spawn) -> None:
    """A read lock like QEMU's image locking (OFD fcntl on byte 100) is no conflict for us."""
    disk = tmp_path / "vhostmd0"
    disk.write_bytes(bytes(65536))
    fd = os.open(disk, os.O_RDONLY)
    try:
        lock = struct.pack("hhqqi", fcntl.F_RDLCK, os.SEEK_SET, 100, 1, 0)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)
        config = write_config(tmp_path / "vhostmd.conf", disk, ANSWER)
        daemon = spawn("-d", "-f", str(config), "-c", "test:///default")
        content = wait_for(lambda: try_read(disk), 15, "the first publish")
        assert metrics_of(content) == {("Answer", "host"): "42"}
        # ... and ours does not conflict with QEMU's either: it can still take its lock.
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_RDLCK, 0, 201, 1, 0))
        assert daemon.stop()[0] == 0
    finally:
        os.close(fd)


@root_only
def test_root_with_d_uses_the_default_pid_file(tmp_path: Path, spawn: Spawn) -> None:
    """As root, -d without -p takes /var/run/vhostmd.pid, as upstream; removed at exit."""
    default = Path("/var/run/vhostmd.pid")
    if default.exists():
        pytest.skip(f"{default} exists (another vhostmd or test on this host)")
    disk = tmp_path / "vhostmd0"
    config = write_config(tmp_path / "vhostmd.conf", disk, ANSWER)
    daemon = spawn("-d", "-f", str(config), "-c", "test:///default", own_pid_file=False)
    try:
        wait_for(lambda: default.exists() and default.read_text(), 15, "the default pid file")
        assert default.read_text() == f"{daemon.pid}\n"
    finally:
        code = daemon.stop()[0]
    assert code == 0
    assert not default.exists()


# --- item 4: -u USER with an installation USER cannot read ---------------------------


@root_only
def test_user_cannot_read_the_installation(tmp_path: Path, spawn: Spawn) -> None:
    """Package (with metric.dtd) under a 0700 root dir, -u nobody: every cycle publishes,
    xml metrics validate, the pid file is gone after SIGTERM."""
    private = Path(tempfile.mkdtemp(prefix="vhostmd-0700-"))
    try:
        os.chmod(private, 0o700)
        shutil.copytree(REPO / "vhostmd_py", private / "vhostmd_py")
        shutil.copytree(REPO / "guest" / "vhostmd_wire", private / "vhostmd_wire")
        shared = Path(tempfile.mkdtemp(prefix="vhostmd-u-"))  # nobody may read the config
        os.chmod(shared, 0o755)
        disk = shared / "vhostmd0"
        xml = ("echo \"<metric type='uint32' context='host'><name>X</name>"
               "<value>3</value></metric>\"")
        metrics = [("Now", "string", "host", "date +%s%N"), ("Xml", "xml", "host", xml)]
        config = write_config(shared / "vhostmd.conf", disk, metrics)
        pid_file = shared / "vhostmd.pid"
        daemon = spawn("-d", "-v", "-u", "nobody", "-p", str(pid_file), "-f", str(config),
                       "-c", "test:///default", env={"PYTHONPATH": str(private)}, cwd=shared)
        first = wait_for(lambda: try_read(disk), 15, "the first publish")
        assert metrics_of(first)[("X", "host")] == "3"
        later = wait_for(lambda: (c := try_read(disk)) and c != first and c, 5, "a later publish")
        assert metrics_of(later)[("X", "host")] == "3"
        assert pwd.getpwuid(os.stat(f"/proc/{daemon.pid}").st_uid).pw_name == "nobody"
        os.kill(daemon.pid, signal.SIGHUP)  # a reload reads vhostmd.dtd again
        wait_for(lambda: "Reloaded configuration" in daemon.log() or "Not reloading" in
                 daemon.log(), 5, "the reload")
        assert daemon.stop()[0] == 0
        log = daemon.log()
        assert "Traceback" not in log and "Not reloading" not in log, log
        assert "Unable to remove pid file" not in log
        assert not pid_file.exists()
        shutil.rmtree(shared)
    finally:
        shutil.rmtree(private, ignore_errors=True)


# --- item 5: the disk file changed under the daemon ------------------------------------


def _published(disk: Path, marker: bytes) -> Callable[[], bytes | None]:
    def probe() -> bytes | None:
        content = try_read(disk)
        return content if content and marker in content else None

    return probe


def test_disk_deleted_replaced_dir_removed_truncated(tmp_path: Path, spawn: Spawn) -> None:
    """Each change is noticed within a cycle and said once; new guests find a valid disk,
    a guest holding the old inode keeps receiving metrics; a truncated disk gets its size."""
    flag = tmp_path / "value"
    flag.write_text("1\n")
    disk = tmp_path / "d" / "vhostmd0"
    config = write_config(tmp_path / "vhostmd.conf", disk,
                          [("V", "string", "host", f"cat {flag}")], size=64)
    daemon = spawn("-d", "-f", str(config), "-c", "test:///default")
    wait_for(_published(disk, b"<value>1</value>"), 15, "the first publish")
    guest = os.open(disk, os.O_RDONLY)  # a running guest: QEMU keeps the inode open
    try:
        disk.unlink()
        wait_for(_published(disk, b"<value>1</value>"), 5, "the disk re-created")
        assert disk.stat().st_size == 64 * 1024
        flag.write_text("2\n")
        wait_for(_published(disk, b"<value>2</value>"), 5, "a new value on the new disk")
        old = read_disk(f"/proc/self/fd/{guest}", direct=False)
        assert b"<value>2</value>" in old  # the old inode still gets every document
        assert daemon.log().count("was deleted") == 1
        # Replaced by another file (rename over it).
        (tmp_path / "d" / "junk").write_bytes(b"junk")
        os.rename(tmp_path / "d" / "junk", disk)
        wait_for(_published(disk, b"<value>2</value>"), 5, "the replaced disk re-created")
        assert daemon.log().count("was replaced by another file") == 1
        # Its directory removed.
        shutil.rmtree(tmp_path / "d")
        wait_for(_published(disk, b"<value>2</value>"), 5, "the directory and disk re-created")
        # Truncated to 0.
        os.truncate(disk, 0)
        wait_for(lambda: disk.stat().st_size == 64 * 1024 and try_read(disk), 5, "the size back")
        assert "is 0 bytes instead of 65536" in daemon.log()
        os.kill(daemon.pid, signal.SIGHUP)
        flag.write_text("3\n")
        wait_for(_published(disk, b"<value>3</value>"), 5, "publishing after SIGHUP")
    finally:
        os.close(guest)
    assert daemon.stop()[0] == 0
    assert read_header(disk).busy == 0


@root_only
@pytest.mark.parametrize("owner", ["nobody", "root"])
def test_symlink_parent_in_sticky_world_writable_dir(tmp_path: Path, spawn: Spawn,
                                                     owner: str) -> None:
    """A directory symlink in a sticky 1777 directory is followed only if ours (root's)."""
    public = tmp_path / "shm"
    public.mkdir()
    os.chmod(public, 0o1777)
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = public / "disks"
    link.symlink_to(target)
    os.lchown(link, pwd.getpwnam(owner).pw_uid, -1)
    config = write_config(tmp_path / "vhostmd.conf", link / "vhostmd0", ANSWER)
    daemon = spawn("-d", "-f", str(config), "-c", "test:///default")
    if owner == "nobody":
        assert daemon.proc.wait(15) == 1
        assert f"refusing to follow the symbolic link {link}" in daemon.log()
        assert not (target / "vhostmd0").exists()
    else:
        wait_for(lambda: try_read(target / "vhostmd0"), 15, "the disk in the link's target")
        assert daemon.stop()[0] == 0


# --- item 8: a full filesystem ---------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for the test (skipped when mounting is refused)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                              capture_output=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot mount a tmpfs: {err}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=10)


def _fill(directory: Path) -> None:
    with contextlib.suppress(OSError), open(directory / "filler", "wb") as fh:
        while True:
            fh.write(bytes(4096))
            fh.flush()


def test_no_room_at_start_up_is_a_clear_error(small_tmpfs: Path, tmp_path: Path,
                                              spawn: Spawn) -> None:
    """A disk the filesystem cannot hold: exit 1 at start-up saying so."""
    (small_tmpfs / "filler").write_bytes(bytes(1024 * 1024 - 128 * 1024))
    config = write_config(tmp_path / "vhostmd.conf", small_tmpfs / "vhostmd0", ANSWER,
                          size=256)
    daemon = spawn("-d", "-f", str(config), "-c", "test:///default")
    assert daemon.proc.wait(15) == 1
    assert "no room for the 262144-byte metrics disk" in daemon.log()


def test_full_filesystem_never_loses_the_last_good_document(small_tmpfs: Path, tmp_path: Path,
                                                            spawn: Spawn) -> None:
    """Disk published short, filesystem filled, then a longer document: it is published whole."""
    flag = tmp_path / "long"
    action = f"if [ -e {flag} ]; then printf 'x%.0s' $(seq 250); else echo s; fi"
    metrics = [(f"M{i}", "string", "host", action) for i in range(120)]
    disk = small_tmpfs / "vhostmd0"
    config = write_config(tmp_path / "vhostmd.conf", disk, metrics, size=256)
    daemon = spawn("-d", "-f", str(config), "-c", "test:///default")
    short = wait_for(lambda: try_read(disk), 15, "the short document")
    assert len(short) < 12 * 1024
    _fill(small_tmpfs)
    flag.touch()
    long = wait_for(lambda: (c := try_read(disk)) and len(c) > 30 * 1024 and c, 10,
                    "the long document")
    assert metrics_of(long)[("M0", "host")] == "x" * 250
    for _ in range(3):  # and it stays readable, checksum and all, cycle after cycle
        assert len(read_disk(disk, busy_timeout=2)) == len(long)
    assert "Unable to publish" not in daemon.log()
    assert daemon.stop()[0] == 0


def test_reload_to_a_disk_larger_than_the_filesystem_is_refused(
    small_tmpfs: Path, tmp_path: Path, spawn: Spawn
) -> None:
    """SIGHUP to 2 MiB on a 1 MiB tmpfs: refused, logged, the old disk keeps publishing."""
    disk = small_tmpfs / "vhostmd0"
    config = write_config(tmp_path / "vhostmd.conf", disk, ANSWER, size=256)
    daemon = spawn("-d", "-f", str(config), "-c", "test:///default")
    wait_for(lambda: try_read(disk), 15, "the first publish")
    write_config(config, disk, ANSWER, size=2048)
    os.kill(daemon.pid, signal.SIGHUP)
    wait_for(lambda: "Not reloading" in daemon.log(), 5, "the refusal")
    assert "no room for the 2097152-byte metrics disk" in daemon.log()
    assert disk.stat().st_size == 256 * 1024
    content = wait_for(lambda: try_read(disk), 5, "a publish")
    assert metrics_of(content) == {("Answer", "host"): "42"}
    assert daemon.stop()[0] == 0


def test_stale_action_dirs_of_dead_daemons_are_removed(tmp_path: Path, spawn: Spawn) -> None:
    """vhostmd-actions.PID.* of a dead pid (kill -9 leftovers) go at start; a live one stays."""
    shm = Path("/dev/shm")
    if not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = shm / f"vhostmd-actions.{dead.pid}.{os.urandom(8).hex()}"
    live = shm / f"vhostmd-actions.{os.getpid()}.{os.urandom(8).hex()}"
    for path in (stale, live):
        path.mkdir(mode=0o700)
        os.mkfifo(path / "0.out")
    try:
        config = write_config(tmp_path / "vhostmd.conf", tmp_path / "vhostmd0", ANSWER)
        daemon = spawn("-d", "-f", str(config), "-c", "test:///default")
        wait_for(lambda: try_read(tmp_path / "vhostmd0"), 15, "the first publish")
        assert not stale.exists()
        assert live.exists()
        assert daemon.stop()[0] == 0
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)
