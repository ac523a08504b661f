"""Benchmark of the virtio transport: the real daemon, the bench playing QEMU for N VMs.

Run:  .venv/bin/python bench/bench_virtio.py                  (N = 100 and 1000)
      .venv/bin/python bench/bench_virtio.py -n 100 --duration 5 --json

For each N it starts `python -m vhostmd_py.cli -d` against libvirt's test driver
with the golden node-N.xml (ids 1..N), update_period 1 and cheap metrics (one
host `echo`, one vm `echo NAME-VMID-UUID`), so the daemon publishes the disk
all the time (a cycle of N shell actions, back to back). The bench creates one
listening UNIX socket per VM in the channel directory, half in libvirt's old
naming (domain-<id>-<name>), half in the new one (<id>-<name>). Phases:

1. baseline: disk publishes per second with no guest traffic;
2. late sockets: all N sockets created at once while the daemon runs: time
   from creation to the daemon's connect and to the first reply (upstream
   scans every 3 s: 3.0 s after start, 0-3 s for a socket created later);
3. paced: every guest asks once per --period seconds (a realistic guest);
   reply latency p50/p99, disk publishes meanwhile, and 20 sockets closed and
   recreated (QEMU restarting the chardev): recreation to first reply;
4. saturation: every guest asks again as soon as it has its reply (closed
   loop, all N at once): replies per second, latency, disk publishes.
Every reply is checked to carry only its own VM's metrics.

Then, with the server alone in this process (no daemon): the idle CPU cost of
N running VMs whose directories hold no vhostmd socket (only a guest agent
socket), with inotify-driven discovery and with polling alone.

The client is one Python process on the same (2-core) machine as the daemon
and the daemon's shell actions, so saturation figures are a floor set partly
by the client itself; all figures of a table come from one run.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import click

from vhostmd_py.cycle.snapshot import Snapshot, VmBlock
from vhostmd_py.publish.virtio import VirtioServer
from vhostmd_py.sources.vm import VM

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # helpers.config: the tests' vhostmd.conf template

from helpers.config import config_text  # noqa: E402

GOLDEN = REPO.parent / "shared" / "golden" / "upstream"
if not (GOLDEN / "FACTS.md").is_file():
    GOLDEN = REPO / "tests" / "data" / "golden" / "upstream"

CHANNEL = "org.github.vhostmd.1"
REQUEST = b"GET /metrics/XML\n\n"
TAIL = b"</metrics>\n\n"
UPSTREAM_CONNECT_S = 3.0  # FACTS.md section 4: 3.01-3.03 s after start; reconnect 3.0 s after close


def virtio_config(work: Path, chan: Path) -> str:
    """vbd + virtio, 4 MiB disk, 1024 channels, two cheap metrics, update_period 1."""
    return config_text(
        f"{work}/vhostmd0",
        [("Answer", "int32", "host", "echo 42"), ("Ident", "string", "vm", "echo NAME-VMID-UUID")],
        size=4, unit="m", transports=("vbd", "virtio"),
        virtio={"channel_path": chan, "max_channels": 1024, "expiration_time": 30},
    )


@dataclass(frozen=True)
class Result:
    """One N's figures (seconds unless the name says ms)."""

    n: int
    first_cycle_s: float
    baseline_publishes_per_s: float
    late_connect_p50_s: float
    late_connect_max_s: float
    late_first_reply_p50_s: float
    late_first_reply_max_s: float
    paced_period_s: float
    paced_replies_per_s: float
    paced_latency_p50_ms: float
    paced_latency_p99_ms: float
    paced_publishes_per_s: float
    recreate_first_reply_p50_s: float
    recreate_first_reply_max_s: float
    sat_replies_per_s: float
    sat_latency_p50_ms: float
    sat_latency_p99_ms: float
    sat_publishes_per_s: float
    sat_daemon_cpu: float
    daemon_vmhwm_kb: int


def pct(values: List[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def vm_of(i: int) -> Tuple[str, str]:
    """(name, uuid) of VM i in node-N.xml."""
    return f"vm{i:04d}", f"00000000-0000-4000-8000-{i:012d}"


def sock_path(chan: Path, i: int) -> Path:
    """Socket of VM i, old naming for odd ids, new naming for even ones."""
    name, _ = vm_of(i)
    d = f"domain-{i}-{name}" if i % 2 else f"{i}-{name}"
    return chan / d / CHANNEL


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vmhwm_kb(pid: int) -> int:
    """Peak RSS of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


class Peer:
    """One VM's channel as QEMU sees it."""

    def __init__(self, i: int, chan: Path) -> None:
        self.i = i
        uuid = vm_of(i)[1].encode()
        self.uuid_attr = b"uuid='" + uuid + b"'"
        path = sock_path(chan, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.listener.setblocking(False)
        self.created = time.monotonic()
        self.conn: socket.socket | None = None
        self.connected_at = 0.0
        self.first_reply_at = 0.0
        self.sent_at = 0.0
        self.buf = b""


class Harness:
    """All peers on one selector; requests and replies, latencies recorded."""

    def __init__(self, chan: Path, disk: Path) -> None:
        self.chan = chan
        self.disk = disk
        self.sel = selectors.DefaultSelector()
        self.peers: Dict[int, Peer] = {}
        self.latencies: List[float] = []
        self.replies = 0
        self.mtimes: set[int] = set()
        self.closed_loop = False
        self.period = 0.0  # 0: no paced re-requests
        self.schedule: List[Tuple[float, int]] = []  # (when, id): paced sends

    def add(self, i: int) -> Peer:
        """A new listening socket for VM i (replacing an old one: QEMU restart)."""
        old = self.peers.get(i)
        if old is not None:
            self.sel.unregister(old.listener)
            old.listener.close()
            if old.conn is not None:
                self.sel.unregister(old.conn)
                old.conn.close()
        p = Peer(i, self.chan)
        self.peers[i] = p
        self.sel.register(p.listener, selectors.EVENT_READ, p)
        return p

    def send(self, p: Peer) -> None:
        """Write a request on P's connection."""
        if p.conn is not None:
            p.conn.send(REQUEST)
            p.sent_at = time.monotonic()

    def run(self, until: float, *, stop_when_all_answered: bool = False) -> None:
        """Serve events until UNTIL."""
        last_stat = 0.0
        while True:
            now = time.monotonic()
            if now >= until:
                return
            if stop_when_all_answered and all(p.first_reply_at for p in self.peers.values()):
                return
            if now - last_stat >= 0.01:
                self.mtimes.add(self.disk.stat().st_mtime_ns)
                last_stat = now
            while self.schedule and self.schedule[0][0] <= now:
                _, i = heapq.heappop(self.schedule)
                self.send(self.peers[i])
            timeout = 0.01
            if self.schedule:
                timeout = max(0.0, min(timeout, self.schedule[0][0] - now))
            for key, _ in self.sel.select(timeout):
                self._event(key.data, key.fileobj)

    def pump(self) -> None:
        """Handle what is ready now, without waiting (accept times stay exact)."""
        for key, _ in self.sel.select(0):
            self._event(key.data, key.fileobj)

    def _event(self, p: Peer, fileobj: object) -> None:
        if fileobj is p.listener:
            try:
                conn, _ = p.listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            if p.conn is not None:
                self.sel.unregister(p.conn)
                p.conn.close()
            p.conn, p.connected_at, p.buf = conn, time.monotonic(), b""
            self.sel.register(conn, selectors.EVENT_READ, p)
            self.send(p)
            return
        assert p.conn is not None
        try:
            data = p.conn.recv(1 << 16)
        except (BlockingIOError, ConnectionResetError):
            return
        if not data:
            self.sel.unregister(p.conn)
            p.conn.close()
            p.conn = None
            return
        p.buf += data
        if not p.buf.endswith(TAIL):
            return
        now = time.monotonic()
        if p.buf.count(b"context='vm'") != p.buf.count(p.uuid_attr) or p.uuid_attr not in p.buf:
            raise SystemExit(f"VM {p.i} got a reply that is not its own: {p.buf[:300]!r}")
        p.buf = b""
        self.replies += 1
        if not p.first_reply_at:
            p.first_reply_at = now
        else:
            self.latencies.append(now - p.sent_at)
        if self.closed_loop:
            self.send(p)
        elif self.period > 0:
            heapq.heappush(self.schedule, (p.sent_at + self.period, p.i))

    def reset_counters(self) -> None:
        """Start a new phase's figures."""
        self.latencies = []
        self.replies = 0
        self.mtimes = set()


def publishes_per_s(mtimes: set[int], seconds: float) -> float:
    """Distinct disk modification times seen, per second (one per publish)."""
    return round(max(0, len(mtimes) - 1) / seconds, 2)


def run_one(n: int, duration: float, period: float) -> Result:
    """Start the daemon for node-N and measure the phases."""
    work = Path(tempfile.mkdtemp(prefix="vbench", dir="/tmp"))
    chan = work / "ch"
    chan.mkdir()
    conf = work / "vhostmd.conf"
    conf.write_text(virtio_config(work, chan))
    shutil.copy(GOLDEN / "configs" / "vhostmd.dtd", work / "vhostmd.dtd")
    disk = work / "vhostmd0"
    uri = f"test://{GOLDEN / 'nodes' / f'node-{n}.xml'}"
    log = (work / "daemon.log").open("wb")
    start = time.monotonic()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "vhostmd_py.cli", "-d", "-f", str(conf)),
            *("-c", uri, "-p", str(work / "pid")),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        want = f"id='{n}'".encode()
        while not (disk.exists() and want in disk.read_bytes()):
            if proc.poll() is not None:
                raise SystemExit(f"daemon died: {(work / 'daemon.log').read_text()}")
            time.sleep(0.01)
        first_cycle = time.monotonic() - start
        h = Harness(chan, disk)

        # 1. baseline
        h.run(time.monotonic() + duration)
        baseline = publishes_per_s(h.mtimes, duration)

        # 2. late sockets (accepting while creating, so early ones are timed right)
        for i in range(1, n + 1):
            h.add(i)
            h.pump()
        h.run(time.monotonic() + 60, stop_when_all_answered=True)
        missing = [p.i for p in h.peers.values() if not p.first_reply_at]
        if missing:
            raise SystemExit(f"{len(missing)} channels never answered: {missing[:10]}")
        connect = [p.connected_at - p.created for p in h.peers.values()]
        first = [p.first_reply_at - p.created for p in h.peers.values()]

        # 3. paced, with 20 sockets recreated
        h.reset_counters()
        h.schedule = []
        h.period = period
        t0 = time.monotonic()
        for k, p in enumerate(h.peers.values()):
            heapq.heappush(h.schedule, (t0 + period * k / n, p.i))
        to_recreate = list(range(1, n + 1, max(1, n // 20)))[:20]
        step = duration / (len(to_recreate) + 2)
        fresh: List[Peer] = []
        for k in range(1, len(to_recreate) + 3):
            h.run(t0 + k * step)
            if to_recreate:
                fresh.append(h.add(to_recreate.pop()))
        h.run(time.monotonic() + 3.0, stop_when_all_answered=True)
        paced_elapsed = time.monotonic() - t0
        recreate = [p.first_reply_at - p.created for p in fresh if p.first_reply_at]
        if len(recreate) != len(fresh):
            raise SystemExit("a recreated socket was never answered")
        paced_lat = h.latencies
        paced_replies = h.replies
        paced_pub = publishes_per_s(h.mtimes, paced_elapsed)

        # 4. saturation (closed loop)
        h.schedule = []
        h.reset_counters()
        h.closed_loop = True
        cpu0 = cpu_seconds(proc.pid)
        t1 = time.monotonic()
        for p in h.peers.values():
            h.send(p)
        h.run(t1 + duration)
        sat_elapsed = time.monotonic() - t1
        sat_cpu = (cpu_seconds(proc.pid) - cpu0) / sat_elapsed
        return Result(
            n=n,
            first_cycle_s=round(first_cycle, 3),
            baseline_publishes_per_s=baseline,
            late_connect_p50_s=round(statistics.median(connect), 4),
            late_connect_max_s=round(max(connect), 4),
            late_first_reply_p50_s=round(statistics.median(first), 4),
            late_first_reply_max_s=round(max(first), 4),
            paced_period_s=period,
            paced_replies_per_s=round(paced_replies / paced_elapsed, 1),
            paced_latency_p50_ms=round(pct(paced_lat, 50) * 1000, 3),
            paced_latency_p99_ms=round(pct(paced_lat, 99) * 1000, 3),
            paced_publishes_per_s=paced_pub,
            recreate_first_reply_p50_s=round(statistics.median(recreate), 4),
            recreate_first_reply_max_s=round(max(recreate), 4),
            sat_replies_per_s=round(h.replies / sat_elapsed, 1),
            sat_latency_p50_ms=round(pct(h.latencies, 50) * 1000, 3),
            sat_latency_p99_ms=round(pct(h.latencies, 99) * 1000, 3),
            sat_publishes_per_s=publishes_per_s(h.mtimes, sat_elapsed),
            sat_daemon_cpu=round(sat_cpu, 3),
            daemon_vmhwm_kb=vmhwm_kb(proc.pid),
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


@dataclass(frozen=True)
class _Settings:
    channel_path: str
    max_channels: int
    expiration_time: int


def idle_cost(n: int, seconds: float, use_inotify: bool) -> float:
    """CPU fraction of a VirtioServer with N channels whose sockets never appear."""
    work = Path(tempfile.mkdtemp(prefix="vidle", dir="/tmp"))
    blocks = []
    for i in range(1, n + 1):
        name, uuid = vm_of(i)
        d = sock_path(work, i).parent
        d.mkdir()
        (d / "org.qemu.guest_agent.0").touch()
        vm = VM(i, name, uuid)
        blocks.append(VmBlock(vm, f"<metric id='{i}'/>\n".encode()))

    async def run() -> float:
        server = VirtioServer(_Settings(str(work), 1024, 30), use_inotify=use_inotify)
        await server.start()
        server.update(Snapshot(b"", tuple(blocks)))
        await asyncio.sleep(0.5)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        elapsed = time.monotonic() - t0
        await server.close()
        used = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        return used / elapsed

    try:
        return round(asyncio.run(run()), 4)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@click.command()
@click.option(
    "-n",
    "sizes",
    type=click.Choice(["100", "1000"]),
    multiple=True,
    help="Number of VMs/channels (default: both).",
)
@click.option("--duration", type=float, default=10.0, show_default=True, help="Seconds per phase.")
@click.option(
    "--period", type=float, default=1.0, show_default=True, help="Paced phase: s between requests."
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON lines.")
def main(sizes: Tuple[str, ...], duration: float, period: float, as_json: bool) -> None:
    """Measure the virtio transport of the real daemon with N = 100 and 1000 channels."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    ns = [int(n) for n in (sizes or ("100", "1000"))]
    results = [run_one(n, duration, period) for n in ns]
    idle = {n: (idle_cost(n, duration / 2, True), idle_cost(n, duration / 2, False)) for n in ns}
    if as_json:
        for r in results:
            print(
                json.dumps(
                    {
                        **asdict(r),
                        "idle_cpu_inotify": idle[r.n][0],
                        "idle_cpu_polling": idle[r.n][1],
                    }
                )
            )
        return
    for r in results:
        print(f"N = {r.n} (first cycle {r.first_cycle_s} s, daemon VmHWM {r.daemon_vmhwm_kb} kB)")
        print(f"  baseline: {r.baseline_publishes_per_s} disk publishes/s")
        print(
            f"  late sockets: connect p50 {r.late_connect_p50_s} s, max {r.late_connect_max_s} s;"
            f" first reply p50 {r.late_first_reply_p50_s} s, max {r.late_first_reply_max_s} s"
            f" (upstream 0-{UPSTREAM_CONNECT_S} s)"
        )
        print(
            f"  paced (1 request/{r.paced_period_s} s per VM): {r.paced_replies_per_s} replies/s,"
            f" latency p50 {r.paced_latency_p50_ms} ms, p99 {r.paced_latency_p99_ms} ms,"
            f" {r.paced_publishes_per_s} publishes/s; recreated socket -> first reply"
            f" p50 {r.recreate_first_reply_p50_s} s, max {r.recreate_first_reply_max_s} s"
            f" (upstream {UPSTREAM_CONNECT_S} s)"
        )
        print(
            f"  saturation: {r.sat_replies_per_s} replies/s, latency p50 {r.sat_latency_p50_ms}"
            f" ms, p99 {r.sat_latency_p99_ms} ms, {r.sat_publishes_per_s} publishes/s,"
            f" daemon CPU {r.sat_daemon_cpu}"
        )
        print(
            f"  idle, {r.n} VMs without a socket: server CPU {idle[r.n][0]} with inotify,"
            f" {idle[r.n][1]} polling every 50 ms"
        )


if __name__ == "__main__":
    main()
