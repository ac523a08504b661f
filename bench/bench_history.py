#!/usr/bin/env python3
"""Cost of the history per cycle at N = 1, 100, 1000 VMs, against the cycle without it.

In one process and one run, for each N it runs the real Daemon (one host
metric `echo 1`, a vbd disk in a private directory, update_period 1) for C
cycles three ways: without <history> (the baseline), with <history> writing
the RRD files directly (librrd), and with <history> through a private
rrdcached (when the binary is installed). Every daemon with history is fed by
a statistics source returning prebuilt StatsSnapshots of N VMs (2 NICs and
2 disks each, counters growing every cycle, real wall and monotonic clocks),
so only the history's own work is measured. With --before, the two history
modes are also run with the files of the previous layout (XenServer's four
resolutions only, "direct-xen" and "rrdcached-xen"), in the same run, to
measure what the graph archives cost. The cycle times are the daemon's
own "cycle N: ..., X s" lines; the first cycle (it creates the N files) is
reported apart. "worker" is the time the history's writer thread spent per
cycle on RRD updates (off the event loop). The disk footprint is the size
and the allocated blocks of one VM's file.

Usage: python bench/bench_history.py [--cycles C] [--nodes 1,100,1000] [--before] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vhostmd_py.config import Config, load_config  # noqa: E402
from vhostmd_py.daemon import Daemon  # noqa: E402
from vhostmd_py.history import rrd  # noqa: E402
from vhostmd_py.sources.shell.runner import ActionRunner  # noqa: E402
from vhostmd_py.sources.stats import (  # noqa: E402
    BlockStats,
    CycleStats,
    HostStats,
    NetStats,
    VmStats,
)

# The daemon's -v line per cycle: "cycle N: M metrics, V VMs, X s".
CYCLE_LINE = re.compile(r"cycle (\d+): .* ([0-9.]+) s$")
TARGET_ADDED_S = 0.25  # at N = 1000

CONFIG = """<?xml version="1.0" ?>
<vhostmd>
  <globals>
    <disk><name>m</name><path>{disk}</path><size unit="m">4</size></disk>
    <update_period>1</update_period>
    <path>/usr/bin:/bin</path>
    <transport>vbd</transport>
    {history}
  </globals>
  <metrics>
    <metric type="int32" context="host"><name>One</name><action>echo 1</action></metric>
  </metrics>
</vhostmd>
"""


class CycleTimes(logging.Handler):
    """Collects the daemon's per-cycle durations from its DEBUG lines."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.times: List[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = CYCLE_LINE.search(record.getMessage())
        if match:
            self.times.append(float(match.group(2)))


class Source:
    """N VMs whose counters grow every read; real clocks."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.i = 0
        self.uuids = [f"00000000-0000-4000-8000-{k:012d}" for k in range(n)]

    def __call__(self, vms: object = None) -> CycleStats:
        self.i += 1
        i = self.i
        vms = tuple(
            VmStats(
                uuid=u, name=f"vm{k}", id=k + 1, vcpus=2, cpu_time=i * 10**9 + k,
                nics=(NetStats("vnet0", i * 1000, i * 10, 0, 0, i * 500, i * 5, 0, 0),
                      NetStats("vnet1", i * 2000, i * 20, 0, 0, i * 700, i * 7, 0, 0)),
                disks=(BlockStats("vda", i * 3, i * 4096, i * 2, i * 8192),
                       BlockStats("vdb", i, i * 512, i, i * 1024)),
            )
            for k, u in enumerate(self.uuids)
        )
        host = HostStats(cpus=2, cpu_ticks={"user": i * 100, "system": i * 20, "idle": i * 80})
        return CycleStats(time.time(), time.monotonic(), host, vms)


def _runner(config: Config) -> ActionRunner:
    return ActionRunner(path=config.path, uri=None, timeout=10)


@dataclass
class Run:
    n: int
    mode: str  # none | direct | rrdcached, -xen: XenServer's layout
    first_s: float
    median_s: float
    worker_per_cycle_s: float | None
    jobs_dropped: int


def run_daemon(work: Path, n: int, cycles: int, history: str, mode: str) -> Run:
    config_path = work / f"{mode}-{n}.xml"
    config_path.write_text(CONFIG.format(disk=work / "vhostmd0", history=history))
    source = Source(n)
    daemon = Daemon(load_config(config_path), uri=None, runner_factory=_runner,
                    stats_source=source)
    handler = CycleTimes()
    logger = logging.getLogger("vhostmd_py.daemon")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    seen: Dict[str, float] = {}
    layout = rrd.ARCHIVE_TARGETS
    if mode.endswith("-xen"):
        rrd.ARCHIVE_TARGETS = rrd.XENSERVER_TARGETS  # what the History's store creates
    daemon.open_disk()

    async def main() -> None:
        task = asyncio.ensure_future(daemon.run(max_cycles=cycles, signals=False))
        while not task.done():
            if daemon.history is not None:
                seen["worker"] = daemon.history.stats.seconds
                seen["jobs"] = daemon.history.stats.jobs_done
                seen["dropped"] = daemon.history.stats.jobs_dropped
            await asyncio.sleep(0.05)
        await task

    try:
        asyncio.run(main())
    finally:
        daemon.close_disk()
        logger.removeHandler(handler)
        rrd.ARCHIVE_TARGETS = layout
    times = handler.times
    worker = None
    if seen.get("jobs"):
        worker = seen["worker"] / seen["jobs"]
    return Run(n, mode, times[0], statistics.median(times[1:]), worker,
               int(seen.get("dropped", 0)))


def start_rrdcached(work: Path) -> Tuple[subprocess.Popen[bytes] | None, str | None]:
    binary = shutil.which("rrdcached") or "/usr/bin/rrdcached"
    if not os.path.exists(binary):
        return None, None
    sock = work / "rrdcached.sock"
    journal = work / "journal"
    journal.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [binary, "-g", "-l", f"unix:{sock}", "-j", str(journal), "-w", "300", "-z", "60",
         "-t", "2", "-p", str(work / "rrdcached.pid")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 5
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return None, None
        time.sleep(0.02)
    return proc, f"unix:{sock}"


def footprint(state: Path) -> Tuple[int, int]:
    files = sorted((state / "vm").glob("*.rrd"))
    st = files[0].stat()
    return st.st_size, st.st_blocks * 512


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=8)
    parser.add_argument("--nodes", default="1,100,1000")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--before", action="store_true",
                        help="also run the history modes with XenServer's layout (-xen)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                        help="where the state directories go (a real disk, not tmpfs)")
    args = parser.parse_args(argv)
    nodes = [int(x) for x in args.nodes.split(",")]
    results: List[Run] = []
    sizes: Dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-history-", dir=args.workdir) as tmp:
        work = Path(tmp)
        cached, address = start_rrdcached(work)
        try:
            for n in nodes:
                modes: List[Tuple[str, str]] = [("none", "")]
                kinds = [("direct", f'<history state_dir="{work}/direct{{}}-{n}"/>')]
                if address is not None:
                    kinds.append(("rrdcached", f'<history state_dir="{work}/cached{{}}-{n}" '
                                               f'rrdcached="{address}"/>'))
                for mode, history in kinds:  # before (-xen) next to after
                    if args.before:
                        modes.append((f"{mode}-xen", history.format("-xen")))
                    modes.append((mode, history.format("")))
                for mode, history in modes:
                    run = run_daemon(work, n, args.cycles, history, mode)
                    results.append(run)
                    w = run.worker_per_cycle_s
                    worker = "-" if w is None else f"{w:.4f} s"
                    print(f"N={n:5d} {mode:9s} first {run.first_s:.3f} s  median "
                          f"{run.median_s:.4f} s  worker/cycle {worker}"
                          f"  dropped {run.jobs_dropped}", flush=True)
            size, allocated = footprint(work / f"direct-{nodes[0]}")
            sizes = {"vm_file_bytes": size, "vm_file_allocated_bytes": allocated}
            if args.before:
                size, allocated = footprint(work / f"direct-xen-{nodes[0]}")
                sizes.update(vm_file_xen_bytes=size, vm_file_xen_allocated_bytes=allocated)
            host = (work / f"direct-{nodes[0]}" / "host.rrd").stat().st_size
            sizes["host_file_bytes"] = host
        finally:
            if cached is not None:
                cached.terminate()
                cached.wait(10)
    print()
    print("| N | mode | first cycle | median cycle | added vs none | ratio | worker per cycle |")
    print("|---|---|---|---|---|---|---|")
    base = {r.n: r.median_s for r in results if r.mode == "none"}
    verdict = True
    for r in results:
        added = r.median_s - base[r.n]
        ratio = r.median_s / base[r.n] if base[r.n] else float("nan")
        worker = "-" if r.worker_per_cycle_s is None else f"{r.worker_per_cycle_s * 1000:.1f} ms"
        print(f"| {r.n} | {r.mode} | {r.first_s * 1000:.1f} ms | {r.median_s * 1000:.1f} ms | "
              f"{added * 1000:+.1f} ms | {ratio:.2f} | {worker} |")
        if r.n == 1000 and r.mode in ("direct", "rrdcached") and added > TARGET_ADDED_S:
            verdict = False
    print()
    print(f"VM file: {sizes['vm_file_bytes']} bytes ({sizes['vm_file_allocated_bytes']} "
          f"allocated); host file: {sizes['host_file_bytes']} bytes")
    if "vm_file_xen_bytes" in sizes:
        print(f"VM file, XenServer's layout: {sizes['vm_file_xen_bytes']} bytes "
              f"({sizes['vm_file_xen_allocated_bytes']} allocated)")
    if 1000 in base:
        print(f"target at N=1000: added <= {TARGET_ADDED_S} s per cycle: "
              f"{'met' if verdict else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"runs": [asdict(r) for r in results], **sizes}, indent=1))
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
