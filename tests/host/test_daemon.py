"""vhostmd_py.daemon (schedule, stop, reload), privileges, logsetup: in process, real parts."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import socket
import threading
import time
from pathlib import Path
from typing import List, Tuple

import pytest
from helpers.config import write_config
from helpers.daemon import metrics_of
from vhostmd_wire.disk import read_disk, read_header

from vhostmd_py import logsetup
from vhostmd_py.config import Config, load_config
from vhostmd_py.cycle.render import document
from vhostmd_py.daemon import Daemon, describe_config
from vhostmd_py.errors import PrivilegeError
from vhostmd_py.libvirt_host import BlockingWorker
from vhostmd_py.process.privileges import Identity, drop_privileges, resolve_user
from vhostmd_py.sources.shell.runner import ActionRunner


def _runner(config: Config) -> ActionRunner:
    return ActionRunner(path=config.path, uri="test:///default", timeout=10)


def _daemon(config_path: Path, **kwargs: object) -> Daemon:
    config = load_config(config_path)
    return Daemon(config, uri="test:///default", runner_factory=_runner,
                  config_loader=load_config, **kwargs)  # type: ignore[arg-type]


async def _watch(disk: Path, task: asyncio.Task[None]) -> List[Tuple[float, bytes]]:
    """Every distinct document seen on DISK while TASK runs, with when it was first seen."""
    seen: List[Tuple[float, bytes]] = []
    while True:
        running = not task.done()
        try:
            content = read_disk(disk, busy_timeout=0.1)
        except Exception:
            content = b""
        if content and (not seen or seen[-1][1] != content):
            seen.append((time.monotonic(), content))
        if not running:  # one last look after the final publish
            return seen
        await asyncio.sleep(0.01)


def _action_times(seen: List[Tuple[float, bytes]]) -> List[float]:
    return [float(metrics_of(c)[("T", "host")]) for _, c in seen]


@pytest.mark.slow  # over 1.5 s: not in the fast tier
def test_cycles_follow_the_period_without_spinning(tmp_path: Path) -> None:
    """update_period 1 with cheap metrics: one cycle per second, not hundreds (upstream)."""
    disk = tmp_path / "vhostmd0"
    config = write_config(tmp_path / "c.xml", disk, [("T", "string", "host", "date +%s.%N")])
    daemon = _daemon(config)
    daemon.open_disk()

    async def main() -> List[Tuple[float, bytes]]:
        task = asyncio.ensure_future(daemon.run(max_cycles=3, signals=False))
        seen = await _watch(disk, task)
        await task
        return seen

    seen = asyncio.run(main())
    assert daemon.cycles == 3
    times = _action_times(seen)
    assert len(times) == 3
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(0.9 < gap < 1.3 for gap in gaps), gaps


@pytest.mark.slow  # over 1.5 s: not in the fast tier
def test_overrun_starts_next_cycle_at_once_without_catch_up(tmp_path: Path) -> None:
    """A 1.5 s cycle with period 1: the next starts at once, never a burst to catch up."""
    disk = tmp_path / "vhostmd0"
    config = write_config(tmp_path / "c.xml", disk,
                          [("T", "string", "host", "date +%s.%N; sleep 1.5")])
    daemon = _daemon(config)
    daemon.open_disk()

    async def main() -> List[Tuple[float, bytes]]:
        task = asyncio.ensure_future(daemon.run(max_cycles=3, signals=False))
        seen = await _watch(disk, task)
        await task
        return seen

    times = _action_times(asyncio.run(main()))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 2
    # Back to back (1.5 s each, no sleep), and no short catch-up cycle.
    assert all(1.45 < gap < 1.9 for gap in gaps), gaps


def test_stop_interrupts_the_sleep(tmp_path: Path) -> None:
    """A stop request during a long sleep (period 30) ends run() at once."""
    disk = tmp_path / "vhostmd0"
    config = write_config(tmp_path / "c.xml", disk, [("A", "int32", "host", "echo 1")], period=30)
    daemon = _daemon(config)
    daemon.open_disk()

    async def main() -> float:
        task = asyncio.ensure_future(daemon.run(signals=False))
        while daemon.cycles < 1:
            await asyncio.sleep(0.01)
        start = time.monotonic()
        daemon.request_stop()
        await task
        return time.monotonic() - start

    assert asyncio.run(main()) < 0.5
    assert read_header(disk).busy == 0


def test_reload_during_sleep_runs_a_cycle_with_the_new_config(tmp_path: Path) -> None:
    """request_reload() wakes the sleep, applies the file, and publishes at once."""
    disk = tmp_path / "vhostmd0"
    config = write_config(tmp_path / "c.xml", disk, [("A", "int32", "host", "echo 1")], period=30)
    daemon = _daemon(config)
    daemon.open_disk()

    async def main() -> bytes:
        task = asyncio.ensure_future(daemon.run(signals=False))
        while daemon.cycles < 1:
            await asyncio.sleep(0.01)
        write_config(config, disk, [("B", "int32", "host", "echo 2")], period=30)
        daemon.request_reload()
        while daemon.cycles < 2:
            await asyncio.sleep(0.01)
        daemon.request_stop()
        await task
        return read_disk(disk)

    assert metrics_of(asyncio.run(main())) == {("B", "host"): "2"}


def test_reload_during_a_cycle_is_applied_right_after_it(tmp_path: Path) -> None:
    """SIGHUP while a cycle runs (period 30): the new config runs at once, not 30 s later."""
    disk = tmp_path / "vhostmd0"
    config = write_config(tmp_path / "c.xml", disk,
                          [("A", "int32", "host", "sleep 0.5; echo 1")], period=30)
    daemon = _daemon(config)
    daemon.open_disk()

    async def main() -> float:
        task = asyncio.ensure_future(daemon.run(signals=False))
        await asyncio.sleep(0.2)  # inside the first cycle's action
        write_config(config, disk, [("B", "int32", "host", "echo 2")], period=30)
        start = time.monotonic()
        daemon.request_reload()
        while daemon.cycles < 2:
            await asyncio.sleep(0.01)
        took = time.monotonic() - start
        daemon.request_stop()
        await task
        return took

    assert asyncio.run(main()) < 2.0
    assert metrics_of(read_disk(disk)) == {("B", "host"): "2"}


def test_reload_keeps_old_config_when_the_disk_cannot_be_created(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A valid new config whose disk cannot be made is refused as a whole."""
    disk = tmp_path / "vhostmd0"
    config = write_config(tmp_path / "c.xml", disk, [("A", "int32", "host", "echo 1")], period=30)
    daemon = _daemon(config)
    daemon.open_disk()

    async def main() -> None:
        task = asyncio.ensure_future(daemon.run(signals=False))
        while daemon.cycles < 1:
            await asyncio.sleep(0.01)
        write_config(config, Path("/proc/no/such/dir/disk"), [("B", "int32", "host", "echo 2")])
        daemon.request_reload()
        while daemon.cycles < 2:
            await asyncio.sleep(0.01)
        daemon.request_stop()
        await task

    asyncio.run(main())
    assert daemon.config.disk_path == str(disk)
    assert "keeping the previous configuration" in caplog.text
    assert metrics_of(read_disk(disk)) == {("A", "host"): "1"}


def test_no_vm_metrics_means_no_libvirt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Host-only configs never touch libvirt (no outage logged for a bad URI)."""
    disk = tmp_path / "vhostmd0"
    config = write_config(tmp_path / "c.xml", disk, [("A", "int32", "host", "echo 1")])
    daemon = Daemon(load_config(config), uri=f"test://{tmp_path}/missing.xml",
                    runner_factory=_runner)
    daemon.open_disk()
    asyncio.run(daemon.run(max_cycles=1, signals=False))
    assert "libvirt" not in caplog.text
    assert metrics_of(read_disk(disk)) == {("A", "host"): "1"}


def test_dump_mode_creates_no_disk(tmp_path: Path) -> None:
    """publish=False: a snapshot is made, no disk is created."""
    disk = tmp_path / "vhostmd0"
    config = write_config(tmp_path / "c.xml", disk, [("I", "string", "vm", "echo NAME")])
    daemon = _daemon(config, publish=False)
    daemon.open_disk()
    asyncio.run(daemon.run(max_cycles=1, signals=False))
    assert daemon.last_snapshot is not None
    assert metrics_of(document(daemon.last_snapshot)) == {("I", "1"): "test"}
    assert not disk.exists()


def test_blocking_worker_runs_calls_in_its_own_thread() -> None:
    """Results and exceptions come back to the loop; the caller's thread never blocks."""
    worker = BlockingWorker()

    async def main() -> Tuple[str | None, str]:
        name = await worker.call(lambda: threading.current_thread().name)
        with pytest.raises(ZeroDivisionError):
            await worker.call(lambda: 1 // 0)
        return name, threading.current_thread().name

    try:
        in_worker, in_loop = asyncio.run(main())
    finally:
        worker.shutdown()
    assert in_worker == "vhostmd-libvirt"
    assert in_loop != in_worker


def test_describe_config_matches_upstream_verbose_lines(upstream: Path) -> None:
    """The -v start-up lines are upstream's (disks/basic-1k.verbose-stdout.txt)."""
    golden = (upstream / "disks" / "basic-1k.verbose-stdout.txt").read_text().splitlines()
    ours = describe_config(load_config(upstream / "configs" / "basic-1k.xml"))
    it = iter(golden)
    assert all(line in it for line in ours), ours
    assert ours[0] == "Number of metrics nodes: 5"


def test_resolve_user_refuses_unknown_and_root() -> None:
    """Unknown users and uid 0 are refused with a typed error naming the user."""
    with pytest.raises(PrivilegeError, match="no such user") as info:
        resolve_user("no-such-user-xyz")
    assert info.value.user == "no-such-user-xyz"
    with pytest.raises(PrivilegeError, match="refusing to run as root"):
        resolve_user("root")
    nobody = pwd.getpwnam("nobody")
    assert resolve_user("nobody") == Identity("nobody", nobody.pw_uid, nobody.pw_gid)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_drop_privileges_in_a_child_clears_groups() -> None:
    """In a forked child: uid/gid nobody's, supplementary groups gone, no way back."""
    ident = resolve_user("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgroups([0, 1, 2])
            drop_privileges(ident)
            status = Path("/proc/self/status").read_text()
            os.write(write_end, status.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    fields = dict(line.split(":", 1) for line in b"".join(chunks).decode().splitlines())
    assert fields["Uid"].split() == [str(ident.uid)] * 4
    assert fields["Gid"].split() == [str(ident.gid)] * 4
    assert fields["Groups"].split() == [str(ident.gid)]


def test_syslog_handler_sends_daemon_facility_records(tmp_path: Path) -> None:
    """Daemonized logging goes to the syslog socket: facility daemon, ident vhostmd[pid]."""
    address = str(tmp_path / "log")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(address)
    sink.settimeout(5)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        handler = logsetup.setup_logging(verbose=0, to_syslog=True, syslog_address=address)
        logging.getLogger("vhostmd_py.test").error("disk on fire")
        logging.getLogger("vhostmd_py.test").info("not at level 0")
        packet = sink.recv(4096)
        handler.close()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        sink.close()
    # <PRI> = facility daemon (3) * 8 + severity err (3) = 27.
    assert packet.rstrip(b"\x00") == f"<27>vhostmd[{os.getpid()}]: disk on fire".encode()


def test_logging_falls_back_to_stderr_without_syslog(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """No /dev/log: records go to stderr rather than nowhere; -v levels as documented."""
    import sys

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logsetup.setup_logging(verbose=1, to_syslog=True, syslog_address=str(tmp_path / "none"),
                               stream=sys.stderr)
        logging.getLogger("vhostmd_py.test").info("hello operator")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert "vhostmd: INFO: hello operator" in capsys.readouterr().err
    assert logsetup.level_for(0) == logging.WARNING
    assert logsetup.level_for(2) == logging.DEBUG
