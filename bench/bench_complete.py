"""Complete documents: how many VM metrics each published document holds, ours and upstream's.

Upstream's perf-virsh1 config (one `virsh CONNECT dominfo NAME` metric per
VM) on libvirt's test driver with N VMs (node-N.xml), update_period 1, both
daemons in the same run, one after the other, each for --seconds. The disk
is polled every 20 ms; every change of its mtime is one publish. Reported per
daemon: publishes per second, document lengths, VM metrics per document
(min / median / max), and the share of documents after the first complete
one that hold all N (the guest's view: a metric it reads must not flicker).

Upstream is built from ../shared/upstream as its README there says, into
--build-dir (kept across runs), unless --upstream names a built binary.

    .venv/bin/python bench/bench_complete.py --n 100 --seconds 25
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "guest"))

from vhostmd_wire.disk import read_disk  # noqa: E402

GOLDEN = REPO / "tests" / "data" / "golden" / "upstream"
SHARED_UPSTREAM = REPO.parent / "shared" / "upstream"


def build_upstream(build_dir: Path) -> Path:
    """Upstream's daemon, built from ../shared/upstream's tarball (its README's steps)."""
    binary = build_dir / "normal" / "vhostmd" / "vhostmd"
    if binary.is_file():
        return binary
    tarball = next(SHARED_UPSTREAM.glob("vhostmd-*.tar.gz"))
    build_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(build_dir)], check=True)
    src = next(p for p in build_dir.iterdir() if p.is_dir() and p.name.startswith("vhostmd-"))
    subprocess.run(["sh", "./autogen.sh"], cwd=src, check=True, capture_output=True)
    shutil.copytree(src, build_dir / "normal", symlinks=True)
    subprocess.run(["./configure", "--without-xenstore"], cwd=build_dir / "normal", check=True,
                   capture_output=True)
    subprocess.run(["make", "-j2"], cwd=build_dir / "normal", check=True, capture_output=True)
    return binary


def config_for(disk: Path) -> str:
    text = (GOLDEN / "configs" / "perf-virsh1.xml").read_text()
    return text.replace("/dev/shm/vhostmd-anchor/perf/vhostmd0", str(disk))


def watch(
    cmd: List[str], disk: Path, seconds: float, env: Dict[str, str]
) -> List[Tuple[float, bytes]]:
    """Run CMD for SECONDS; every distinct published document with when it was first seen."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    seen: List[Tuple[float, bytes]] = []
    start = time.monotonic()
    last = None
    try:
        while time.monotonic() - start < seconds:
            # A publish writes the file: its mtime tells one publish from the next
            # even when two documents are the same bytes.
            try:
                stamp = disk.stat().st_mtime_ns
            except OSError:
                stamp = None
            if stamp is not None and stamp != last:
                try:
                    doc = read_disk(disk, busy_timeout=0.5)
                except Exception:
                    doc = b""
                if doc:
                    last = stamp
                    seen.append((time.monotonic() - start, doc))
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return seen


def summarize(
    name: str, n: int, docs: List[Tuple[float, bytes]], seconds: float
) -> Dict[str, object]:
    counts = [d.count(b"<name>VCpus</name>") for _, d in docs]
    lengths = [len(d) for _, d in docs]
    first = next((i for i, c in enumerate(counts) if c == n), None)
    after = counts[first:] if first is not None else []
    complete = sum(1 for c in after if c == n)
    return {
        "daemon": name,
        "publishes": len(docs),
        "per_s": len(docs) / seconds,
        "first_complete_s": None if first is None else round(docs[first][0], 2),
        "complete_after_first": f"{complete}/{len(after)}",
        "vm_metrics_min": min(counts, default=0),
        "vm_metrics_median": statistics.median(counts) if counts else 0,
        "vm_metrics_max": max(counts, default=0),
        "length_min": min(lengths, default=0),
        "length_max": max(lengths, default=0),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="VMs (node-N.xml in tests/data)")
    ap.add_argument("--seconds", type=float, default=25.0)
    ap.add_argument("--upstream", type=Path, help="upstream's built vhostmd binary")
    ap.add_argument("--build-dir", type=Path, default=Path("/var/tmp/vhostmd-bench-upstream"))
    args = ap.parse_args()
    node = GOLDEN / "nodes" / f"node-{args.n}.xml"
    uri = f"test://{node}"
    upstream = args.upstream or build_upstream(args.build_dir)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-complete-", dir="/dev/shm") as tmp:
        work = Path(tmp)
        shutil.copy(GOLDEN / "configs" / "vhostmd.dtd", work / "vhostmd.dtd")
        env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'guest'}", LC_ALL="C")
        for name, make in (
            ("upstream", lambda c, p: [str(upstream), "-d", "-f", str(c), "-c", uri, "-p", str(p)]),
            ("vhostmd-py", lambda c, p: [sys.executable, "-c",
                                         "from vhostmd_py.cli import main; main()",
                                         "-d", "-f", str(c), "-c", uri, "-p", str(p)]),
        ):
            disk = work / f"{name}.disk"
            conf = work / f"{name}.xml"
            conf.write_text(config_for(disk))
            docs = watch(make(conf, work / f"{name}.pid"), disk, args.seconds, env)
            rows.append(summarize(name, args.n, docs, args.seconds))
    keys = list(rows[0])
    print(" ".join(f"{k:>20}" for k in keys))
    for row in rows:
        print(" ".join(f"{row[k]!s:>20}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
