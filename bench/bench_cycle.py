#!/usr/bin/env python3
"""Cycle time and peak RSS of the real `vhostmd` daemon, compared with upstream's figures.

For each metrics config (upstream's perf-echo3.xml and perf-virsh1.xml, disk path
moved to a private directory) and each node (1, 10, 100, 1000 domains of
libvirt's test driver), it runs the daemon in the foreground twice: serial
(--jobs 1, upstream's way: one action at a time) and concurrent (the default
bound), reads the per-cycle "cycle N took X s" DEBUG lines, and the daemon's
VmHWM from /proc just before SIGTERM (as upstream's perf/SUMMARY.txt did).
The first cycle (it opens the libvirt connection) is reported apart; "median"
is the median of the following cycles. Ratios are ours / upstream's (below 1
is faster or smaller). Upstream's figures came from the same kind of 2-core
machine (FACTS.md section 6); both are noisy, expect +-20 %.

Usage: python bench/bench_cycle.py [--runs R] [--cycles C] [--only echo3|virsh1]
       [--nodes 1,10,100,1000] [--with-virsh1-1000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parent.parent
GOLDEN_CANDIDATES = (REPO.parent / "shared" / "golden" / "upstream",
                     REPO / "tests" / "data" / "golden" / "upstream")
ANCHOR_DISK = "/dev/shm/vhostmd-anchor/perf/vhostmd0"
# The daemon's -v line per cycle (daemon.Daemon._loop): number, duration.
CYCLE_LINE = re.compile(r"cycle (\d+): \d+ metrics, \d+ VMs, ([0-9.]+) s")

# Targets (fractions of upstream's median cycle; absolute RSS in kB).
TARGETS = {
    ("echo3", 1000): 0.5,
    ("virsh1", 100): 0.6,
}
RSS_TARGETS_KB = {1: 40 * 1024, 1000: 45 * 1024}


@dataclass(frozen=True)
class Upstream:
    """One row of upstream's perf/SUMMARY.txt."""

    median: float
    first: float
    length: int
    vmhwm_kb: int


@dataclass(frozen=True)
class Result:
    """One (config, N, mode) measurement."""

    config: str
    n: int
    mode: str
    cycles: int
    median: float
    first: float
    vmhwm_kb: int
    length: int
    cpu_self: float  # daemon CPU seconds per steady cycle (user + system)
    cpu_children: float  # CPU seconds of its reaped children (the actions) per cycle


def cpu_times(pid: int) -> Tuple[float, float]:
    """(own, reaped children's) CPU seconds of PID from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / tick, (cutime + cstime) / tick


def golden_dir() -> Path:
    """The golden upstream directory (../shared first, then the copy in tests/data)."""
    for candidate in GOLDEN_CANDIDATES:
        if (candidate / "perf" / "SUMMARY.txt").is_file():
            return candidate
    raise SystemExit("golden data not found (../shared/golden or tests/data/golden)")


def read_upstream(golden: Path) -> Dict[Tuple[str, int], Upstream]:
    """Parse perf/SUMMARY.txt."""
    rows = {}
    for line in (golden / "perf" / "SUMMARY.txt").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        rows[(f[0], int(f[1]))] = Upstream(float(f[4]), float(f[6]), int(f[7]), int(f[8]))
    return rows


def status_kb(pid: int, field: str) -> int:
    """A kB field of /proc/PID/status (VmHWM, VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def disk_length(disk: Path) -> int:
    """The content length in the disk header (bytes 12..16, big-endian)."""
    try:
        with open(disk, "rb") as handle:
            return int.from_bytes(handle.read(16)[12:16], "big")
    except OSError:
        return 0


@dataclass(frozen=True)
class Watched:
    """What watch_daemon saw of one daemon run."""

    took: List[float]  # every cycle's duration, from the daemon's -vv "cycle N took" lines
    vmhwm_kb: int  # peak RSS at the end
    cpu_self: float  # daemon CPU seconds per cycle after the first (nan: none counted)
    cpu_children: float  # its children's (the actions') CPU seconds per cycle


def watch_daemon(args: List[str], log_path: Path, want: int, timeout: float,
                 poll: float) -> Watched:
    """Run the daemon ARGS (stderr to LOG_PATH) until WANT cycles after the first, or TIMEOUT.

    CPU is counted from the end of the first cycle (start-up excluded) to the
    last one seen; the sampling points fall within POLL of cycle ends.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO))
    took: List[float] = []
    hwm = 0
    start: Tuple[float, float] | None = None
    base = 0
    end = (0.0, 0.0)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                took = [float(m.group(2)) for m in CYCLE_LINE.finditer(log_path.read_text())]
                if took and start is None:
                    start, base = cpu_times(proc.pid), len(took)
                if len(took) >= want + 1:
                    break
                time.sleep(poll)
            if proc.poll() is None:
                hwm = status_kb(proc.pid, "VmHWM")
                end = cpu_times(proc.pid)
                proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    counted = len(took) - base
    own = kids = float("nan")
    if start is not None and counted > 0:
        own = (end[0] - start[0]) / counted
        kids = (end[1] - start[1]) / counted
    return Watched(took, hwm, own, kids)


def run_one(config_name: str, n: int, jobs: int | None, golden: Path, workdir: Path,
            want_cycles: int, timeout: float) -> Result:
    """Run the daemon until WANT_CYCLES cycles after the first (or TIMEOUT); measure."""
    disk = workdir / "vhostmd0"
    text = (golden / "configs" / f"perf-{config_name}.xml").read_text()
    config = workdir / f"perf-{config_name}.xml"
    config.write_text(text.replace(ANCHOR_DISK, str(disk)))
    uri = f"test://{golden / 'nodes' / f'node-{n}.xml'}"
    log_path = workdir / "daemon.log"
    args = [sys.executable, "-m", "vhostmd_py.cli", "-d", "-vv", "-f", str(config), "-c", uri]
    if jobs is not None:
        args += ["--jobs", str(jobs)]
    w = watch_daemon(args, log_path, want_cycles, timeout, poll=0.05)
    if not w.took:
        raise SystemExit(f"no cycle completed: {config_name} N={n}\n{log_path.read_text()}")
    steady = w.took[1:] or w.took
    return Result(config_name, n, "serial" if jobs == 1 else "concurrent", len(steady),
                  statistics.median(steady), w.took[0], w.vmhwm_kb, disk_length(disk),
                  w.cpu_self, w.cpu_children)


def main() -> int:
    """Run the matrix, print the table, say whether the targets are met."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="runs per row (median of medians)")
    parser.add_argument("--cycles", type=int, default=5, help="steady cycles per run (max)")
    parser.add_argument("--only", choices=("echo3", "virsh1"), default=None)
    parser.add_argument("--nodes", default="1,10,100,1000")
    parser.add_argument("--with-virsh1-1000", action="store_true",
                        help="also virsh1 with 1000 domains (minutes per cycle serially)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    opts = parser.parse_args()
    golden = golden_dir()
    upstream = read_upstream(golden)
    # Bytecode first, as pip compiles it at install time: a daemon compiling its
    # own sources at start-up (PYTHONDONTWRITEBYTECODE, an editable checkout)
    # keeps ~1.5 MB more RSS for the compiler's memory.
    # The daemon imports vhostmd_wire (guest/) too: compile both, as an install would.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "vhostmd_py"),
                    str(REPO / "guest" / "vhostmd_wire")],
                   check=True, stdout=subprocess.DEVNULL)
    nodes = [int(x) for x in opts.nodes.split(",")]
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    results: List[Result] = []
    print(f"{'config':8} {'N':>5} {'mode':10} {'cyc':>4} {'median_s':>9} {'upstream_s':>10} "
          f"{'ratio':>6} {'first_s':>8} {'len_B':>7} {'VmHWM_kB':>9} {'up_kB':>7} {'ratio':>6} "
          f"{'cpu_s':>6} {'child_s':>7}")
    for config_name in ("echo3", "virsh1"):
        if opts.only and config_name != opts.only:
            continue
        for n in nodes:
            if config_name == "virsh1" and n == 1000 and not opts.with_virsh1_1000:
                continue
            ref = upstream[(config_name, n)]
            # At most ~4 upstream cycles of waiting per run, at least 20 s.
            timeout = max(20.0, 4 * ref.median * (opts.cycles + 2) + 10)
            for jobs in (1, None):
                runs = []
                for _ in range(opts.runs):
                    workdir = Path(tempfile.mkdtemp(prefix="vhostmd-bench-", dir=base))
                    try:
                        runs.append(run_one(config_name, n, jobs, golden, workdir,
                                            opts.cycles, timeout))
                    finally:
                        shutil.rmtree(workdir, ignore_errors=True)
                res = Result(config_name, n, runs[0].mode, sum(r.cycles for r in runs),
                             statistics.median(r.median for r in runs),
                             statistics.median(r.first for r in runs),
                             max(r.vmhwm_kb for r in runs), runs[0].length,
                             statistics.median(r.cpu_self for r in runs),
                             statistics.median(r.cpu_children for r in runs))
                results.append(res)
                print(f"{config_name:8} {n:>5} {res.mode:10} {res.cycles:>4} {res.median:>9.4f} "
                      f"{ref.median:>10.4f} {res.median / ref.median:>6.2f} {res.first:>8.3f} "
                      f"{res.length:>7} {res.vmhwm_kb:>9} {ref.vmhwm_kb:>7} "
                      f"{res.vmhwm_kb / ref.vmhwm_kb:>6.2f} {res.cpu_self:>6.3f} "
                      f"{res.cpu_children:>7.3f}", flush=True)
    print()
    ok = True
    for res in results:
        limit = TARGETS.get((res.config, res.n))
        if limit is not None and res.mode == "concurrent":
            ratio = res.median / upstream[(res.config, res.n)].median
            met = ratio <= limit
            ok &= met
            print(f"target {res.config} N={res.n}: cycle ratio {ratio:.2f} <= {limit} "
                  f"{'met' if met else 'NOT MET'}")
        rss_limit = RSS_TARGETS_KB.get(res.n)
        if rss_limit is not None:
            met = res.vmhwm_kb <= rss_limit
            ok &= met
            print(f"target RSS {res.config} N={res.n} {res.mode}: {res.vmhwm_kb} kB <= "
                  f"{rss_limit} kB {'met' if met else 'NOT MET'}")
    if opts.json is not None:
        opts.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
