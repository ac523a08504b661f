#!/usr/bin/env python3
"""Memory and start-up of the real `vhostmd` daemon beside upstream vhostmd 1.2, same run.

Both daemons run in the foreground with upstream's perf-echo3 config (three
vm metrics `echo ...`, 1 MiB vbd disk, update period 1; the disk moved to a
private directory on /dev/shm) against libvirt's test driver node of N
domains (tests/data/golden/upstream/nodes/node-N.xml), and so does the
floor (bench/footprint_floor.py: the same work in the fewest lines of Python
with lxml and libvirt, the interpreter's and the libraries' share of any
Python daemon). Rounds are interleaved: in each round every N runs ours,
upstream's and the floor (the order rotating from round to round) and the
bare interpreter of the same venv (`python -c pass`, 5 times), so machine
noise hits all alike.

What is measured, the same way for all three:
- start to first publish: from just before the spawn to the first time the
  disk's header says "not busy, content present" (inotify on the disk's
  directory wakes the benchmark at every write; it then reads the header);
- VmHWM (peak RSS) from /proc/PID/status after the first publish plus a
  dwell of max(3 s, 2.5 first cycles), so at least two more cycles ran;
  /proc/PID/smaps_rollup (anonymous vs file-backed) and the largest mappings
  of /proc/PID/smaps at the same moment.
Reported: medians over the rounds, ratios ours / upstream and ours / floor,
growth from the smallest to the largest N, and first publish / `python -c
pass` for ours and the floor.

--where adds where our memory goes: one extra run of ours at the largest N
under tracemalloc (the Python heap by file, at the end), and what each
top-level package the daemon had loaded costs alone in a fresh interpreter
(VmHWM over `python -c pass`).

Upstream is built at run time from the source tarball in ../shared/upstream
(its README's steps; only the normal build) into --build-dir, once; nothing
of it is in this repository. --upstream BIN uses a daemon built elsewhere.

Usage: python bench/bench_footprint.py [--rounds 3] [--nodes 1,1000]
       [--upstream BIN | --build-dir DIR] [--where] [--json FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parent.parent
GOLDEN_CANDIDATES = (REPO.parent / "shared" / "golden" / "upstream",
                     REPO / "tests" / "data" / "golden" / "upstream")
# The upstream source sits in a "shared/upstream" directory beside the checkout
# (or beside the directory holding the worktrees).
UPSTREAM_SOURCES = [p / "shared" / "upstream" for p in REPO.parents]
ANCHOR_DISK = "/dev/shm/vhostmd-anchor/perf/vhostmd0"
SIGNATURE = 0x6D766264  # "mvbd"
# The same work in the fewest lines of Python with lxml and libvirt (its docstring).
FLOOR = Path(__file__).resolve().parent / "footprint_floor.py"
IMPLS = ("ours", "upstream", "floor")

# The footprint targets (kB, and a multiple of the bare interpreter's start-up).
HWM_TARGET_KB = {1: 40 * 1024}
GROWTH_TARGET_KB = 15 * 1024
FIRST_PUBLISH_TARGET = 6.0

# inotify(7)
IN_MODIFY, IN_ATTRIB, IN_MOVED_TO, IN_CREATE = 0x2, 0x4, 0x80, 0x100
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC


@dataclass
class Run:
    """One daemon run."""

    impl: str
    n: int
    first_s: float  # spawn to first completed publish
    first_cycle_s: float  # disk created to first completed publish
    vmhwm_kb: int
    vmrss_kb: int
    threads: int
    fds: int
    rollup: Dict[str, int] = field(default_factory=dict)  # smaps_rollup, kB
    mappings: List[Tuple[str, int]] = field(default_factory=list)  # largest Rss by mapping


class DirWatch:
    """inotify on one directory: wait() returns when something in it was written."""

    def __init__(self, path: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = IN_MODIFY | IN_ATTRIB | IN_MOVED_TO | IN_CREATE
        if self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")

    def wait(self, timeout: float) -> bool:
        """True when events came within TIMEOUT (all drained)."""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return False
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        os.close(self.fd)


def golden_dir() -> Path:
    """The golden upstream directory (../shared first, then the copy in tests/data)."""
    for candidate in GOLDEN_CANDIDATES:
        if (candidate / "configs" / "perf-echo3.xml").is_file():
            return candidate
    raise SystemExit("golden data not found (../shared/golden or tests/data/golden)")


def nodes_dir() -> Path:
    """The node files: the repository's copy (the one the tests use)."""
    for candidate in (REPO / "tests" / "data" / "golden" / "upstream" / "nodes",
                      REPO.parent / "shared" / "golden" / "upstream" / "nodes"):
        if (candidate / "node-1.xml").is_file():
            return candidate
    raise SystemExit("libvirt test driver node files not found")


def build_upstream(build_dir: Path) -> Path:
    """Upstream's daemon, built once into BUILD_DIR from ../shared/upstream's tarball."""
    binaries = sorted(build_dir.glob("vhostmd-*/vhostmd/vhostmd"))
    if binaries:
        return binaries[0]
    tarballs = [t for d in UPSTREAM_SOURCES for t in sorted(d.glob("vhostmd-*.tar.gz"))]
    if not tarballs:
        raise SystemExit("no upstream source tarball in a shared/upstream directory above the "
                         "checkout (use --upstream BIN)")
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    print(f"building upstream from {tarballs[0].name} in {build_dir} (log {log})", flush=True)
    with open(log, "wb") as out:
        subprocess.run(["tar", "-xzf", str(tarballs[0]), "-C", str(build_dir)], check=True,
                       stdout=out, stderr=subprocess.STDOUT)
        source = sorted(p for p in build_dir.glob("vhostmd-*") if p.is_dir())[0]
        for step in (["sh", "./autogen.sh"], ["./configure", "--without-xenstore"],
                     ["make", "-j2"]):
            subprocess.run(step, cwd=source, check=True, stdout=out, stderr=subprocess.STDOUT)
    return source / "vhostmd" / "vhostmd"


# The interpreter of the venv whose `vhostmd` is measured (main() sets it).
PYTHON = Path(sys.executable)


def install_venv(parent: Path) -> Path:
    """A fresh venv in PARENT with this tree pip-installed (not editable), as an operator has.

    From a copy of the tracked files: pip builds a local directory in place
    and would leave build/ and *.egg-info in the checkout.
    """
    venv = Path(tempfile.mkdtemp(prefix="vhostmd-footprint-venv-", dir=parent))
    source = venv / "src"
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True,
                           check=True).stdout.split(b"\0")
    for name in filter(None, (os.fsdecode(f) for f in files)):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    base = getattr(sys, "_base_executable", sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    print(f"installing this tree into {venv} (pip, not editable)", flush=True)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, env=env)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    str(source / "guest"), f"{source}[host]"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(source)
    return venv / "bin" / "python"


def our_command() -> List[str]:
    """The console script beside PYTHON, else `python -m`."""
    script = PYTHON.parent / "vhostmd"
    if script.is_file():
        return [str(script)]
    return [str(PYTHON), "-m", "vhostmd_py.cli"]


def read_header(disk: Path) -> Tuple[int, int, int] | None:
    """(signature, busy, length) of the disk, None when it is not there yet."""
    try:
        with open(disk, "rb") as handle:
            head = handle.read(16)
    except OSError:
        return None
    if len(head) < 16:
        return None
    return (int.from_bytes(head[0:4], "big"), int.from_bytes(head[4:8], "big"),
            int.from_bytes(head[12:16], "big"))


def status_fields(pid: int) -> Dict[str, int]:
    """The numeric fields of /proc/PID/status (kB for the Vm/Rss ones)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0])
    return out


def smaps_rollup(pid: int) -> Dict[str, int]:
    """/proc/PID/smaps_rollup, kB."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0])
    return out


def largest_mappings(pid: int, top: int = 8) -> List[Tuple[str, int]]:
    """Rss (kB) by mapping name in /proc/PID/smaps (anonymous ones as [anon]), largest first."""
    sizes: Dict[str, int] = {}
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            name = head[5].strip() if len(head) == 6 else "[anon]"
            name = os.path.basename(name) if name.startswith("/") else name
        elif line.startswith("Rss:"):
            sizes[name] = sizes.get(name, 0) + int(line.split()[1])
    return sorted(sizes.items(), key=lambda kv: -kv[1])[:top]


def run_daemon(impl: str, argv: List[str], disk: Path, n: int, timeout: float,
               env: Dict[str, str] | None = None) -> Run:
    """Spawn ARGV, time its first publish on DISK, measure after the dwell, stop it."""
    watch = DirWatch(disk.parent)
    log = disk.parent / f"{impl}.log"
    created = first = None
    try:
        with open(log, "wb") as log_file:
            start = time.monotonic()
            # cwd /: `python -c` puts the cwd first on sys.path (a checkout there
            # would be imported instead of the venv's install).
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log_file, env=env,
                                    cwd="/")
            try:
                deadline = start + timeout
                while first is None:
                    now = time.monotonic()
                    if now > deadline or proc.poll() is not None:
                        raise SystemExit(f"{impl} N={n}: no publish (rc {proc.poll()}); "
                                         f"log:\n{log.read_text()[-3000:]}")
                    watch.wait(min(0.5, deadline - now))
                    head = read_header(disk)
                    now = time.monotonic()
                    if head is None:
                        continue
                    if created is None:
                        created = now
                    if head[0] == SIGNATURE and head[1] == 0 and head[2] > 0:
                        first = now
                assert created is not None
                dwell = max(3.0, 2.5 * (first - created))
                time.sleep(dwell)
                if proc.poll() is not None:
                    raise SystemExit(f"{impl} N={n}: exited rc {proc.returncode} after publishing"
                                     f"; log:\n{log.read_text()[-3000:]}")
                status = status_fields(proc.pid)
                run = Run(impl, n, first - start, first - created, status.get("VmHWM", 0),
                          status.get("VmRSS", 0), status.get("Threads", 0),
                          len(os.listdir(f"/proc/{proc.pid}/fd")), smaps_rollup(proc.pid),
                          largest_mappings(proc.pid))
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    finally:
        watch.close()
    return run


def bare_start(runs: int = 5) -> float:
    """Median wall time of `python -c pass` with this venv's interpreter."""
    times = []
    for _ in range(runs):
        start = time.monotonic()
        subprocess.run([str(PYTHON), "-c", "pass"], check=True, cwd="/")
        times.append(time.monotonic() - start)
    return statistics.median(times)


def prepare(workdir: Path, golden: Path) -> Tuple[Path, Path]:
    """The echo3 config with its disk in WORKDIR (and upstream's DTD beside it)."""
    disk = workdir / "vhostmd0"
    config = workdir / "perf-echo3.xml"
    text = (golden / "configs" / "perf-echo3.xml").read_text()
    config.write_text(text.replace(ANCHOR_DISK, str(disk)))
    shutil.copy(golden / "configs" / "vhostmd.dtd", workdir / "vhostmd.dtd")
    return config, disk


def one(impl: str, n: int, upstream: Path, golden: Path, base: Path, timeout: float) -> Run:
    """One run of IMPL at N VMs in a fresh directory."""
    workdir = Path(tempfile.mkdtemp(prefix="vhostmd-footprint-", dir=base))
    try:
        config, disk = prepare(workdir, golden)
        uri = f"test://{nodes_dir() / f'node-{n}.xml'}"
        # A pid file of its own: as root both default to /var/run/vhostmd.pid.
        common = ["-d", "-p", str(workdir / "pid"), "-f", str(config), "-c", uri]
        if impl == "upstream":
            argv = [str(upstream), *common]
        elif impl == "floor":
            argv = [str(PYTHON), str(FLOOR), str(config), uri]
        else:
            argv = [*our_command(), *common]
        return run_daemon(impl, argv, disk, n, timeout)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


TRACE_WRAPPER = """
import atexit, json, sys, tracemalloc
tracemalloc.start(1)
out = sys.argv.pop(1)
def dump():
    snap = tracemalloc.take_snapshot()
    current, peak = tracemalloc.get_traced_memory()
    stats = snap.statistics("filename")
    top = [(s.traceback[0].filename, s.size // 1024, s.count) for s in stats[:15]]
    packages = sorted({m.split(".")[0] for m in sys.modules if not m.startswith("_")})
    with open(out, "w") as f:
        json.dump({"current_kb": current // 1024, "peak_kb": peak // 1024, "top": top,
                   "packages": packages, "modules": len(sys.modules)}, f)
atexit.register(dump)
from vhostmd_py.cli import main
sys.argv[0] = "vhostmd"
main()
"""


def where(n: int, golden: Path, base: Path, timeout: float) -> Dict[str, object]:
    """tracemalloc of ours at N, and each loaded package's cost alone."""
    workdir = Path(tempfile.mkdtemp(prefix="vhostmd-footprint-", dir=base))
    try:
        config, disk = prepare(workdir, golden)
        uri = f"test://{nodes_dir() / f'node-{n}.xml'}"
        out = workdir / "trace.json"
        argv = [str(PYTHON), "-c", TRACE_WRAPPER, str(out), "-d", "-p", str(workdir / "pid"),
                "-f", str(config), "-c", uri]
        run_daemon("ours-traced", argv, disk, n, timeout)
        traced = json.loads(out.read_text())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    probe = ("import sys\n{}\nfor l in open('/proc/self/status'):\n"
             "    l.startswith('VmHWM') and print(l.split()[1])")
    def hwm(stmt: str) -> int:
        res = subprocess.run([str(PYTHON), "-c", probe.format(stmt)], capture_output=True, cwd="/",
                             text=True)
        return int(res.stdout.split()[0]) if res.returncode == 0 and res.stdout else -1
    floor = hwm("pass")
    alone = {}
    for package in traced["packages"]:
        cost = hwm(f"import {package}")
        if cost >= 0 and cost - floor >= 256:
            alone[package] = cost - floor
    return {"tracemalloc": traced, "interpreter_kb": floor,
            "package_alone_kb": dict(sorted(alone.items(), key=lambda kv: -kv[1]))}


def median_of(runs: List[Run], impl: str, n: int, attr: str) -> float:
    """The median of ATTR over IMPL's runs at N."""
    return float(statistics.median(getattr(r, attr) for r in runs if r.impl == impl and r.n == n))


def main() -> int:
    """Interleaved rounds; the table; the targets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", default="1,1000")
    parser.add_argument("--upstream", type=Path, default=None, help="upstream's vhostmd binary")
    parser.add_argument("--build-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "vhostmd-upstream-build",
                        help="where upstream is built (once) when --upstream is not given")
    parser.add_argument("--venv", default="install",
                        help="'install': pip-install this tree into a fresh venv (default); "
                             "'current': this interpreter's venv (an editable install "
                             "imports its finder in every interpreter); or a venv's directory")
    parser.add_argument("--where", action="store_true", help="also tracemalloc and import costs")
    parser.add_argument("--timeout", type=float, default=60.0, help="per run, to first publish")
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args()
    golden = golden_dir()
    upstream = opts.upstream or build_upstream(opts.build_dir)
    global PYTHON
    installed: Path | None = None
    if opts.venv == "install":
        opts.build_dir.mkdir(parents=True, exist_ok=True)
        PYTHON = install_venv(opts.build_dir)
        installed = PYTHON.parent.parent
    elif opts.venv == "current":
        # Bytecode first, as an install compiles it: a daemon compiling its own
        # sources at start-up would pay the compiler's time and memory.
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "vhostmd_py"),
                        str(REPO / "guest" / "vhostmd_wire")], check=True,
                       stdout=subprocess.DEVNULL)
    else:
        PYTHON = Path(opts.venv) / "bin" / "python"
    try:
        return measure(opts, golden, upstream)
    finally:
        if installed is not None:
            shutil.rmtree(installed, ignore_errors=True)


def measure(opts: argparse.Namespace, golden: Path, upstream: Path) -> int:
    """The rounds, the table, the targets."""
    nodes = [int(x) for x in opts.nodes.split(",")]
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    runs: List[Run] = []
    bare: List[float] = []
    for rnd in range(opts.rounds):
        order = IMPLS[rnd % 3:] + IMPLS[:rnd % 3]
        for n in nodes:
            for impl in order:
                run = one(impl, n, upstream, golden, base, opts.timeout)
                runs.append(run)
                print(f"round {rnd + 1} {impl:8} N={n:<5} first {run.first_s:.3f} s "
                      f"(cycle {run.first_cycle_s:.3f} s) VmHWM {run.vmhwm_kb} kB "
                      f"anon {run.rollup.get('Anonymous', 0)} kB threads {run.threads} "
                      f"fds {run.fds}", flush=True)
        bare.append(bare_start())
    bare_s = statistics.median(bare)
    lo, hi = min(nodes), max(nodes)
    print()
    print(f"| measurement (median of {opts.rounds} rounds) | ours | upstream | floor | "
          "ours / upstream | ours / floor |")
    print("|---|---|---|---|---|---|")
    table: Dict[str, Dict[str, float]] = {}
    for n in nodes:
        for attr, label, scale, unit in (("vmhwm_kb", "VmHWM", 1 / 1024, "MB"),
                                         ("first_s", "start to first publish", 1, "s")):
            ours = median_of(runs, "ours", n, attr)
            up = median_of(runs, "upstream", n, attr)
            floor = median_of(runs, "floor", n, attr)
            table[f"{attr}@{n}"] = {"ours": ours, "upstream": up, "floor": floor}
            print(f"| {label}, N={n} ({unit}) | {ours * scale:.3f} | {up * scale:.3f} | "
                  f"{floor * scale:.3f} | {ours / up:.2f} | {ours / floor:.2f} |")
    growth = {impl: median_of(runs, impl, hi, "vmhwm_kb") - median_of(runs, impl, lo, "vmhwm_kb")
              for impl in IMPLS}

    def ratio_of(a: float, b: float) -> float:
        return a / b if b else float("nan")

    print(f"| VmHWM growth N={lo} to N={hi} (MB) | {growth['ours'] / 1024:.1f} | "
          f"{growth['upstream'] / 1024:.1f} | {growth['floor'] / 1024:.1f} | "
          f"{ratio_of(growth['ours'], growth['upstream']):.2f} | "
          f"{ratio_of(growth['ours'], growth['floor']):.2f} |")
    first1 = median_of(runs, "ours", lo, "first_s")
    floor1 = median_of(runs, "floor", lo, "first_s")
    print(f"| `python -c pass` (s) | {bare_s:.3f} | | | | |")
    print(f"| first publish N={lo} / `python -c pass` | {first1 / bare_s:.2f} | | "
          f"{floor1 / bare_s:.2f} | | |")
    print()
    for n in nodes:
        for impl in IMPLS:
            last = [r for r in runs if r.impl == impl and r.n == n][-1]
            keys = ("Rss", "Anonymous", "Pss_Anon", "Pss_File", "Private_Dirty")
            rollup = ", ".join(f"{k} {last.rollup.get(k, 0)}" for k in keys)
            maps = ", ".join(f"{name} {kb}" for name, kb in last.mappings)
            print(f"{impl} N={n}: smaps_rollup kB: {rollup}\n    largest Rss kB: {maps}")
    ok = True
    print()
    for n, limit in HWM_TARGET_KB.items():
        if n in nodes:
            value = median_of(runs, "ours", n, "vmhwm_kb")
            met = value <= limit
            ok &= met
            short = (value - limit) / 1024
            print(f"target VmHWM N={n} <= {limit // 1024} MB: {value / 1024:.1f} MB "
                  f"{'met' if met else f'NOT MET by {short:.1f} MB'}")
    if lo == 1 and hi == 1000:
        met = growth["ours"] <= GROWTH_TARGET_KB
        ok &= met
        short = (growth["ours"] - GROWTH_TARGET_KB) / 1024
        print(f"target growth 1->1000 <= {GROWTH_TARGET_KB // 1024} MB: "
              f"{growth['ours'] / 1024:.1f} MB {'met' if met else f'NOT MET by {short:.1f} MB'}")
    ratio = first1 / bare_s
    met = ratio <= FIRST_PUBLISH_TARGET
    ok &= met
    print(f"target first publish <= {FIRST_PUBLISH_TARGET:g} x python -c pass: {ratio:.2f} x "
          f"{'met' if met else 'NOT MET'}")
    extra: Dict[str, object] = {}
    if opts.where:
        extra = where(hi, golden, base, opts.timeout)
        traced = extra["tracemalloc"]
        assert isinstance(traced, dict)
        print(f"\ntracemalloc, ours N={hi}: {traced['current_kb']} kB traced now "
              f"(peak {traced['peak_kb']} kB), {traced['modules']} modules; by file (kB, blocks):")
        for filename, kb, count in traced["top"]:
            print(f"    {kb:7} {count:8}  {filename}")
        print(f"each loaded package alone over the interpreter ({extra['interpreter_kb']} kB):")
        for package, kb in extra["package_alone_kb"].items():  # type: ignore[attr-defined]
            print(f"    {kb:7} kB  {package}")
    if opts.json is not None:
        opts.json.write_text(json.dumps({"runs": [asdict(r) for r in runs], "bare_s": bare,
                                         "table": table, "growth_kb": growth, **extra},
                                        indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
