"""End-to-end tests of vm-dump-metrics: every golden reader case, run as a real process.

Each upstream case in golden/upstream/reader/cases is replayed against our
tool with the same arguments and image. The disk is found through a
temporary /sys + /dev tree (the no-argument discovery path), on a
filesystem with O_DIRECT. Exit code and stdout/dest bytes must equal
upstream's, except for the deviations docs/COMPATIBILITY.md lists (Guest), asserted explicitly.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Sequence

import pytest

UPSTREAM_PORT = "/dev/virtio-ports/org.github.vhostmd.1"
BUSY_TIMEOUT = "0.5"  # instead of the 10 s default, to keep the suite fast


def _tool() -> List[str]:
    # VM_DUMP_METRICS: another build of the tool to run these cases against
    # (the wheel or the .pyz, tests/guest/test_guest_distribution.py).
    other = os.environ.get("VM_DUMP_METRICS")
    if other:
        return shlex.split(other)
    script = Path(sys.executable).parent / "vm-dump-metrics"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vhostmd_guest"]


class Result(NamedTuple):
    code: int
    stdout: bytes
    stderr: str
    wall: float


def run_tool(
    args: Sequence[str], *, env: Dict[str, str] | None = None, timeout: float = 30
) -> Result:
    """Run our vm-dump-metrics as a process."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [*_tool(), *args], capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )
    return Result(proc.returncode, proc.stdout, proc.stderr.decode(), time.monotonic() - t0)


def _tree(root: Path, image: Path | None) -> List[str]:
    """A /sys + /dev tree with a decoy disk and, if given, the image as vdb; the roots as args."""
    for name, sectors in (("sr0", 0), ("vda", 16), ("vdb", 128)):
        (root / "sys" / "block" / name).mkdir(parents=True)
        (root / "sys" / "block" / name / "size").write_text(f"{sectors}\n")
    (root / "dev").mkdir()
    (root / "dev" / "vda").write_bytes(b"\0" * 8192)
    if image is not None:
        shutil.copyfile(image, root / "dev" / "vdb")
    return [
        "--sys-root",
        str(root / "sys"),
        "--dev-root",
        str(root / "dev"),
        "--port",
        str(root / "virtio-ports" / "org.github.vhostmd.1"),
    ]


def _cases(golden_root: Path) -> List[str]:
    cases = golden_root / "upstream" / "reader" / "cases"
    return sorted(p.name for p in cases.iterdir() if (p / "cmd.txt").is_file())


def _golden_root() -> Path:
    from conftest import golden_root

    return golden_root()


# Guest deviations: case -> (our exit code, what stderr must say)
DEVIATIONS = {
    "busy-stuck-default": (1, "still busy"),  # upstream: hangs (killed by timeout, 124)
    "busy-stuck-vbd": (1, "still busy"),
    "badsum-vbd": (1, "checksum mismatch"),  # upstream: prints the content, exit 0
    "small-1k-vbd": (0, ""),  # upstream: cannot read a disk under 64 KiB, exit 1
    # Upstream printed 751 bytes + 100 NULs; they are not XML, we refuse them.
    "len-plus-100-vbd": (1, "not well-formed XML"),
}


# Upstream reached libxml with an uninitialised buffer for these; we stop
# earlier, at the length check (the content cannot fit the disk), and say so.
LENGTH_CHECKED = {"len-huge-vbd", "len-over-file-vbd"}
LIBXML_LINE = "LIBMETRICS: read_mdisk(): libxml failed to parse mdisk.xml buffer"


def _upstream_lines(stderr: str, port: str) -> List[str]:
    """Upstream's own LIBMETRICS lines (libxml's parser chatter is not reproduced)."""
    return [
        line.replace(UPSTREAM_PORT, port)
        for line in stderr.splitlines()
        if line.startswith("LIBMETRICS:")
    ]


def _is_subsequence(needles: Sequence[str], hay: Sequence[str]) -> bool:
    it = iter(hay)
    return all(any(n == h for h in it) for n in needles)


# Replayed with a live writer in test_busy_cleared_while_waiting.
LIVE_CASES = {"busy-cleared-after-3s"}


@pytest.mark.parametrize("case", [c for c in _cases(_golden_root()) if c not in LIVE_CASES])
def test_golden_reader_case(case: str, upstream: Path, tmp_path: Path) -> None:
    """Our exit code and bytes equal upstream's for the case, or differ as documented."""
    cdir = upstream / "reader" / "cases" / case
    argv = (cdir / "cmd.txt").read_text().split()[1:]
    image_name = (cdir / "image.txt").read_text().strip()
    image = None if image_name == "none" else upstream / "reader" / "images" / image_name
    tree_args = _tree(tmp_path / "root", image)
    port = tree_args[-1]
    dest: Path | None = None
    args: List[str] = []
    for a in argv:
        if a == "/dev/shm/out.xml":
            dest = tmp_path / "out.xml"
            a = str(dest)
        elif a.startswith("/nonexistent-dir/"):
            dest = tmp_path / "nonexistent-dir" / "out.xml"
            a = str(dest)
        args.append(a)
    result = run_tool([*args, *tree_args, "--busy-timeout", BUSY_TIMEOUT])

    up_code = int((cdir / "exit_code.txt").read_text())
    up_stdout = (cdir / "stdout.bin").read_bytes()
    up_stderr = (cdir / "stderr.txt").read_text(errors="replace")
    if case in DEVIATIONS:
        code, says = DEVIATIONS[case]
        assert result.code == code, result.stderr
        assert says in result.stderr
        if case == "small-1k-vbd":
            good = (upstream / "reader" / "cases" / "good-vbd" / "stdout.bin").read_bytes()
            assert result.stdout == good
        else:
            assert result.stdout == b""
        if case.startswith("busy-stuck"):
            assert result.wall < float(BUSY_TIMEOUT) + 8
        return
    assert result.code == up_code, result.stderr
    assert result.stdout == up_stdout
    if (cdir / "dest.bin").exists():
        assert dest is not None
        assert dest.read_bytes() == (cdir / "dest.bin").read_bytes()
    elif dest is not None:
        assert not dest.exists()
    ours = result.stderr.splitlines()
    if up_code == 2:
        # Usage: upstream's text (leading blank line, tab-indented options) is
        # kept line for line; our extra options are added between its lines.
        assert _is_subsequence(up_stderr.splitlines(), ours), result.stderr
        return
    expected = _upstream_lines(up_stderr, port)
    if case in LENGTH_CHECKED:
        expected.remove(LIBXML_LINE)
        assert "goes beyond the disk" in result.stderr
    assert _is_subsequence(expected, ours), result.stderr
    if up_code == 1 and case != "nodisk-virtio":
        # Next to upstream's lines, a line of ours says why (for a missing
        # virtio port upstream's own line already names the OS error).
        assert any(line.startswith("vm-dump-metrics: ") for line in ours), result.stderr
    elif case == "good-verbose":
        assert "metrics disk found" in result.stderr  # -v: our debug log on stderr
    elif up_code == 0:
        assert result.stderr == ""


def test_every_golden_case_is_known(upstream: Path) -> None:
    """The case list is the golden one (no case silently skipped)."""
    assert len(_cases(upstream.parent)) == 28
    assert set(DEVIATIONS) | LIVE_CASES | LENGTH_CHECKED <= set(_cases(upstream.parent))


def test_busy_cleared_while_waiting(upstream: Path, tmp_path: Path) -> None:
    """A busy disk cleared by the writer after a while is printed (golden busy-cleared case)."""
    cdir = upstream / "reader" / "cases" / "busy-cleared-after-3s"
    tree_args = _tree(tmp_path, upstream / "reader" / "images" / "busy.img")
    good_header = (upstream / "reader" / "images" / "good.img").read_bytes()[:16]

    t0 = time.monotonic()
    proc = subprocess.Popen(
        [*_tool(), "-b", *tree_args, "--busy-timeout", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # The writer (a real process) clears busy 1 s after the reader started.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, time; time.sleep(1.0); f = open(sys.argv[1], 'r+b'); "
            "f.write(bytes.fromhex(sys.argv[2])); f.close()",
            str(tmp_path / "dev" / "vdb"),
            good_header.hex(),
        ],
        check=True,
        timeout=30,
    )
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == (cdir / "stdout.bin").read_bytes()
    assert time.monotonic() - t0 >= 1.0


def test_explicit_disk_path(upstream: Path, tmp_path: Path) -> None:
    """--disk reads that file directly (no /sys walk)."""
    disk = tmp_path / "disk.img"
    shutil.copyfile(upstream / "reader" / "images" / "good.img", disk)
    result = run_tool(["-b", "--disk", str(disk), "--sys-root", str(tmp_path / "none")])
    assert result.code == 0
    assert result.stdout == (upstream / "reader" / "cases" / "good-vbd" / "stdout.bin").read_bytes()


def test_default_busy_timeout_is_ten_seconds() -> None:
    """The usage text documents the busy limit and its default."""
    result = run_tool(["--help"])
    assert result.code == 2
    assert "--busy-timeout S" in result.stderr
    assert "(default 10)" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-z"], "vm-dump-metrics: invalid option -- 'z'"),
        (["-bz"], "vm-dump-metrics: invalid option -- 'z'"),
        (["--zap"], "vm-dump-metrics: unrecognized option '--zap'"),
        (["-d"], "vm-dump-metrics: option requires an argument -- 'd'"),
        (["--dest"], "vm-dump-metrics: option '--dest' requires an argument"),
        (["--busy-timeout", "soon"], "vm-dump-metrics: Invalid value for '--busy-timeout'"),
        (["extra"], "vm-dump-metrics: Got unexpected extra argument (extra)"),
    ],
)
def test_usage_errors_exit_2(args: List[str], message: str) -> None:
    """Bad command lines exit 2 with getopt-style wording and the usage text."""
    result = run_tool(args)
    assert result.code == 2
    assert result.stderr.startswith(message)
    assert "\nUsage: vm-dump-metrics [options]\n" in result.stderr
    assert result.stdout == b""


@pytest.mark.parametrize("flag", ["--version", "--vers"])
def test_version_on_stdout_exits_0(flag: str) -> None:
    """--version (ours) and its unique abbreviations: the version on stdout, exit 0."""
    import vhostmd_guest

    result = run_tool([flag, "--disk", "/nonexistent"])
    assert (result.code, result.stderr) == (0, "")
    expected = f"vm-dump-metrics (vhostmd-py-guest) {vhostmd_guest.__version__}\n"
    assert result.stdout.decode() == expected


@pytest.mark.parametrize("flag", ["--ve", "--ver"])
def test_short_prefixes_still_mean_verbose(flag: str, tmp_path: Path) -> None:
    """--ve/--ver abbreviate --verbose, as upstream's getopt_long takes them: not --version."""
    result = run_tool([flag, "--disk", str(tmp_path / "no-disk")])
    assert result.code == 1
    assert "no-disk" in result.stderr and "vhostmd-py-guest" not in result.stderr
    assert b"vhostmd-py-guest" not in result.stdout


def test_underscore_alias_installed() -> None:
    """vm_dump_metrics is installed beside vm-dump-metrics and behaves the same."""
    alias = Path(sys.executable).parent / "vm_dump_metrics"
    if not alias.exists():
        pytest.skip("console scripts not installed in this environment")
    proc = subprocess.run([str(alias), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "Usage: vm_dump_metrics [options]" in proc.stderr


class Pty(NamedTuple):
    master: int
    slave: int
    path: str


@pytest.fixture
def pty_port() -> Iterator[Pty]:
    """A raw pty pair standing in for the virtio port (master = host side)."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    try:
        yield Pty(master, slave, os.ttyname(slave))
    finally:
        os.close(master)
        os.close(slave)


def _answer_once(master: int, reply: bytes) -> threading.Thread:
    def serve() -> None:
        got = b""
        while not got.endswith(b"\n\n"):
            got += os.read(master, 64)
        os.write(master, reply)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_virtio_reply_printed_and_written(pty_port: Pty, upstream: Path, tmp_path: Path) -> None:
    """-i prints the host's reply byte for byte; with -d it goes to the file."""
    reply = (upstream / "virtio" / "single" / "get_xml_lf.bin").read_bytes()
    host = _answer_once(pty_port.master, reply)
    result = run_tool(["-i", "--port", pty_port.path])
    host.join(5)
    assert result.code == 0, result.stderr
    assert result.stdout == reply
    host = _answer_once(pty_port.master, reply)
    result = run_tool(["-i", "--port", pty_port.path, "-d", str(tmp_path / "v.xml")])
    host.join(5)
    assert result.code == 0
    assert (tmp_path / "v.xml").read_bytes() == reply


def test_default_order_falls_back_to_virtio(pty_port: Pty, upstream: Path, tmp_path: Path) -> None:
    """No flag and no disk: the virtio port answers, exit 0, the disk failure is reported."""
    reply = (upstream / "virtio" / "single" / "get_xml_lf.bin").read_bytes()
    args = [*_tree(tmp_path, None)[:-2], "--port", pty_port.path]
    host = _answer_once(pty_port.master, reply)
    result = run_tool(args)
    host.join(5)
    assert result.code == 0
    assert result.stdout == reply
    assert "LIBMETRICS: read_mdisk(): Unable to read metrics disk" in result.stderr


def test_virtio_silent_host_times_out(pty_port: Pty) -> None:
    """A host that never answers: exit 1 after --virtio-timeout with upstream's lines."""
    result = run_tool(["-i", "--port", pty_port.path, "--virtio-timeout", "0.5"])
    assert result.code == 1
    assert "LIBMETRICS: get_virtio_metrics(): Unable to read metrics - timeout after 0.5s" in (
        result.stderr
    )
    assert result.stderr.rstrip().endswith(
        "LIBMETRICS: get_virtio_metrics(): Unable to read metrics"
    )
    assert result.wall < 5


def test_virtio_port_held_by_another_process_is_ebusy(pty_port: Pty) -> None:
    """EBUSY on open (port held elsewhere) is reported as such, exit 1."""
    import fcntl
    import termios

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv not installed")
    # TIOCEXCL makes further opens fail with EBUSY, as a held virtio port
    # does; root bypasses it with CAP_SYS_ADMIN, so drop that capability.
    fcntl.ioctl(pty_port.slave, termios.TIOCEXCL)
    cmd = [setpriv, "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", *_tool()]
    proc = subprocess.run(
        [*cmd, "-i", "--port", pty_port.path], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1
    assert f"open({pty_port.path}) Device or resource busy" in proc.stderr
    assert "another process holds the port open" in proc.stderr


def test_failed_read_creates_no_dest_file(tmp_path: Path) -> None:
    """With -d and a failing read no file is created (as upstream)."""
    dest = tmp_path / "out.xml"
    args = _tree(tmp_path, None)
    result = run_tool(["-d", str(dest), *args])
    assert result.code == 1
    assert not dest.exists()


def test_stdout_closed_is_a_clean_failure(upstream: Path, tmp_path: Path) -> None:
    """A closed stdout (EPIPE) gives exit 1 and a message, not a traceback."""
    disk = tmp_path / "disk.img"
    shutil.copyfile(upstream / "reader" / "images" / "good.img", disk)
    r, w = os.pipe()
    os.close(r)
    proc = subprocess.run(
        [*_tool(), "-b", "--disk", str(disk)], stdout=w, stderr=subprocess.PIPE, timeout=30
    )
    os.close(w)
    assert proc.returncode == 1
    assert b"Traceback" not in proc.stderr
    assert b"unable to export metrics" in proc.stderr


def test_verbose_explains_discovery(upstream: Path, tmp_path: Path) -> None:
    """-v keeps stdout identical and logs which devices were probed."""
    args = _tree(tmp_path, upstream / "reader" / "images" / "good.img")
    result = run_tool(["-v", *args])
    assert result.code == 0
    assert (
        result.stdout
        == (upstream / "reader" / "cases" / "good-verbose" / "stdout.bin").read_bytes()
    )
    assert "metrics disk found" in result.stderr


@pytest.mark.parametrize("option", ["--busy-timeout", "--virtio-timeout"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_timeouts_must_be_finite(option: str, value: str, tmp_path: Path) -> None:
    """A nan/inf/negative timeout is a usage error (exit 2), never a hang."""
    proc = subprocess.run(
        [*_tool(), "-b", "--disk", str(tmp_path / "none"), option, value],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert option in proc.stderr
