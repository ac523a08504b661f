#!/usr/bin/env python3
"""Cycle time, daemon CPU per cycle and peak RSS: built-in SAP profile vs its shell-action twin.

Runs the real `vhostmd` daemon in the foreground (as bench/bench_cycle.py
does) with conf/sap-vhostmd.conf (every metric a built-in source) and
conf/examples/sap-vhostmd-shell.conf (the same metrics from shell actions),
update period 1 s, disk moved to a private directory, against libvirt's test
driver with 1, 10, 100, 1000 domains (golden nodes/node-N.xml); and upstream's
perf-virsh1 shape (one `virsh dominfo` per VM) for comparison. It reads the
"cycle N took X s" DEBUG lines (median of the steady cycles, the first one
apart), the daemon's own and its children's CPU per cycle from /proc, and
VmHWM just before SIGTERM.

Usage: python bench/bench_native.py [--cycles C] [--nodes 1,10,100,1000]
       [--shell-nodes 1,10,100] [--virsh1-nodes 1,10,100] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cycle import ANCHOR_DISK, golden_dir, read_upstream, watch_daemon

REPO = Path(__file__).resolve().parent.parent
PROFILES = {
    "native": REPO / "conf" / "sap-vhostmd.conf",
    "shell": REPO / "conf" / "examples" / "sap-vhostmd-shell.conf",
}
TARGET_N1000_S = 0.5


@dataclass(frozen=True)
class Result:
    """One (profile, N) measurement."""

    profile: str
    n: int
    cycles: int
    median: float
    first: float
    cpu_self: float  # daemon CPU seconds per steady cycle
    cpu_children: float  # CPU seconds of its children (the actions) per cycle
    vmhwm_kb: int


def _config(profile: str, workdir: Path, golden: Path) -> Path:
    """The profile's config with a private disk and update period 1 s."""
    disk = str(workdir / "vhostmd0")
    if profile == "virsh1":
        text = (golden / "configs" / "perf-virsh1.xml").read_text().replace(ANCHOR_DISK, disk)
    else:
        text = PROFILES[profile].read_text().replace("/dev/shm/vhostmd0", disk)
        text = text.replace("<update_period>60</update_period>",
                            "<update_period>1</update_period>")
    path = workdir / f"{profile}.conf"
    path.write_text(text)
    return path


def run_one(profile: str, n: int, golden: Path, want: int, timeout: float) -> Result:
    """Run the daemon until WANT steady cycles (or TIMEOUT) and measure."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    workdir = Path(tempfile.mkdtemp(prefix="vhostmd-bench-native-", dir=base))
    try:
        config = _config(profile, workdir, golden)
        uri = f"test://{golden / 'nodes' / f'node-{n}.xml'}"
        log_path = workdir / "daemon.log"
        args = [sys.executable, "-m", "vhostmd_py.cli", "-d", "-vv", "-f", str(config),
                "-c", uri]
        w = watch_daemon(args, log_path, want, timeout, poll=0.02)
        if not w.took:
            raise SystemExit(f"no cycle completed: {profile} N={n}\n{log_path.read_text()}")
        steady = w.took[1:] or w.took
        return Result(profile, n, len(steady), statistics.median(steady), w.took[0],
                      w.cpu_self, w.cpu_children, w.vmhwm_kb)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    """Run the matrix, print the table and the N=1000 target."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--nodes", default="1,10,100,1000")
    parser.add_argument("--shell-nodes", default="1,10,100")
    parser.add_argument("--virsh1-nodes", default="1,10,100")
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args()
    golden = golden_dir()
    upstream = read_upstream(golden)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "vhostmd_py")],
                   check=True, stdout=subprocess.DEVNULL)
    plan = [("native", int(n)) for n in opts.nodes.split(",") if n]
    plan += [("shell", int(n)) for n in opts.shell_nodes.split(",") if n]
    plan += [("virsh1", int(n)) for n in opts.virsh1_nodes.split(",") if n]
    print(f"{'profile':8} {'N':>5} {'cyc':>4} {'median_s':>9} {'first_s':>8} {'cpu_s':>7} "
          f"{'child_s':>8} {'VmHWM_kB':>9} {'up_s':>8}")
    results: List[Result] = []
    for profile, n in plan:
        up = upstream.get((profile, n))
        timeout = 60.0 + (up.median * (opts.cycles + 2) * 2 if up else 0.0) + n * 0.2
        if profile == "shell":
            timeout += n * 0.5 * (opts.cycles + 2)
        res = run_one(profile, n, golden, opts.cycles, timeout)
        results.append(res)
        print(f"{profile:8} {n:>5} {res.cycles:>4} {res.median:>9.4f} {res.first:>8.3f} "
              f"{res.cpu_self:>7.4f} {res.cpu_children:>8.4f} {res.vmhwm_kb:>9} "
              f"{up.median if up else float('nan'):>8.3f}", flush=True)
    print()
    by = {(r.profile, r.n): r for r in results}
    for n in sorted({r.n for r in results}):
        nat, sh = by.get(("native", n)), by.get(("shell", n))
        if nat and sh:
            # CPU times tick in 10 ms: a few short native cycles may count 0.
            cpu = (f"{(sh.cpu_self + sh.cpu_children) / nat.cpu_self:.1f}x"
                   if nat.cpu_self > 0 else "n/a (native below the CPU clock tick)")
            print(f"N={n}: shell/native cycle {sh.median / nat.median:.1f}x, "
                  f"CPU (own+children) {cpu}, "
                  f"RSS native {nat.vmhwm_kb} kB shell {sh.vmhwm_kb} kB")
    ok = True
    nat1000 = by.get(("native", 1000))
    if nat1000 is not None:
        ok = nat1000.median <= TARGET_N1000_S
        print(f"target native N=1000: {nat1000.median:.3f} s <= {TARGET_N1000_S} s "
              f"{'met' if ok else 'NOT MET'}")
    if opts.json:
        opts.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
