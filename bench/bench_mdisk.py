"""Benchmark of the metrics disk: C binding vs pure-Python twin vs a bare pwrite.

Run:  .venv/bin/python bench/bench_mdisk.py [--dir /dev/shm] [--repeat 7] [--json]

All figures of one table come from one run, so their ratios are comparable;
absolute times depend on the machine. The disk lives where the daemon keeps
it (/dev/shm, tmpfs) unless --dir says otherwise.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import click
from vhostmd_wire import disk as wire

from vhostmd_py.publish import mdisk

# C's stable-read attempt is test-only C (csrc/tests/mdisk_read.c), built by
# the tests' helper on first use; guests read in pure Python.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.cread import CReadStrategy

KIB = 1024
DOC_256K = 256 * KIB


@dataclass(frozen=True)
class Timing:
    """Per-call times of one measurement, in microseconds."""

    name: str
    calls: int
    median_us: float
    p99_us: float

    @property
    def per_second(self) -> float:
        """Calls per second at the median."""
        return 1e6 / self.median_us


def _per_call(fn: Callable[[], object], calls: int, repeat: int) -> List[float]:
    """Microseconds per call of fn, one sample per batch of `calls` calls."""
    samples = []
    fn()  # warm up (page faults, buffer allocation)
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return samples


def _single_calls(fn: Callable[[], object], calls: int) -> List[float]:
    """Microseconds of each of `calls` individual calls (for latency percentiles)."""
    fn()
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e6)
    return out


def _timing(name: str, samples: List[float], calls: int) -> Timing:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return Timing(name, calls, statistics.median(ordered), p99)


def _document(size: int) -> bytes:
    # XML-like, with some bytes >= 0x80 so the signed checksum path is exercised.
    line = b"  <metric type='string' context='host'><name>x</name><value>\xc3\xa9</value>\n"
    return (line * (size // len(line) + 1))[:size]


def bench_publish(workdir: str, calls: int) -> Dict[str, Timing]:
    """Publishing a 256 KiB document: C, Python twin, and one plain pwrite (the floor).

    The three are interleaved call by call (Python every 10th round, it is
    slow) so that noise from other work on the machine hits them alike.
    """
    doc = _document(DOC_256K)
    floor_path = os.path.join(workdir, "publish-floor")
    fd = os.open(floor_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    # The host publishes through C only (there is no Python writer to compare).
    samples: Dict[str, List[float]] = {"c": [], "floor": []}
    try:
        os.ftruncate(fd, 1024 * KIB)
        with mdisk.MetricsDisk.create(os.path.join(workdir, "publish-c"), 1024 * KIB) as cdisk:
            steps: List[Tuple[str, Callable[[], object]]] = [
                ("c", functools.partial(cdisk.publish, doc)),
                ("floor", functools.partial(os.pwrite, fd, doc, 16)),
            ]
            for _, fn in steps:
                fn()  # warm up: page faults of the disk files
            for _ in range(calls):
                for label, fn in steps:
                    start = time.perf_counter()
                    fn()
                    samples[label].append((time.perf_counter() - start) * 1e6)
    finally:
        os.close(fd)
    return {
        "c": _timing("publish 256 KiB (c)", samples["c"], calls),
        "floor": _timing("one pwrite of 256 KiB (floor)", samples["floor"], calls),
    }


def bench_checksum(repeat: int) -> Dict[str, Dict[str, float]]:
    """Checksum throughput in GB/s (10**9 bytes/s) on 256 KiB and 16 MiB buffers."""
    out: Dict[str, Dict[str, float]] = {}
    for size in (DOC_256K, 16 * 1024 * KIB):
        data = _document(size)
        row = {}
        for label, module in (("c", mdisk), ("py", wire)):
            calls = max(1, (256 * 1024 * KIB if label == "c" else 32 * 1024 * KIB) // size)
            samples = _per_call(functools.partial(module.checksum, data), calls, repeat)
            row[label] = size / (statistics.median(samples) * 1e-6) / 1e9
        out[f"{size // KIB} KiB"] = row
    return out


def bench_read(workdir: str, calls: int) -> Dict[str, Timing]:
    """Stable-read latency of 4 KiB and 256 KiB documents (reader kept open, and one-shot)."""
    results = {}
    for size in (4 * KIB, DOC_256K):
        doc = _document(size)
        path = os.path.join(workdir, f"read-{size}")
        with mdisk.MetricsDisk.create(path, 1024 * KIB) as disk:
            disk.publish(doc)
            # One retry policy (vhostmd_wire.disk.DiskReader); only the attempt differs.
            strategies = (("c", CReadStrategy), ("py", wire.PyReadStrategy))
            for label, strategy in strategies:
                reader = wire.DiskReader(path, strategy=strategy())
                try:
                    assert reader.read() == doc
                    samples = _single_calls(reader.read, calls)
                finally:
                    reader.close()
                results[f"{size}-{label}"] = _timing(
                    f"DiskReader.read {size // KIB} KiB ({label})", samples, calls
                )
                # A strategy per call: read_disk frees its buffer when it closes.
                def oneshot(path: str = path, strategy: Callable[[], object] = strategy) -> bytes:
                    return wire.read_disk(path, strategy=strategy())
                samples = _single_calls(oneshot, calls)
                results[f"{size}-{label}-oneshot"] = _timing(
                    f"read_disk {size // KIB} KiB, open+read+close ({label})", samples, calls
                )
        os.unlink(path)
    return results


def _check_o_direct(workdir: str) -> bool:
    path = os.path.join(workdir, "probe")
    with mdisk.MetricsDisk.create(path, 4096) as disk:
        disk.publish(b"probe")
    with wire.DiskReader(path) as reader:
        direct = reader.direct
    os.unlink(path)
    return direct


def _ratio(rows: Dict[str, Timing], slow: str, fast: str) -> float:
    return rows[slow].median_us / rows[fast].median_us


def run(base_dir: str, repeat: int) -> Dict[str, object]:
    """All measurements of one run, with the ratios derived from them."""
    workdir = tempfile.mkdtemp(prefix="vhostmd-bench-", dir=base_dir)
    try:
        direct = _check_o_direct(workdir)
        publish = bench_publish(workdir, calls=2000)
        checksum = bench_checksum(repeat)
        read = bench_read(workdir, calls=2000)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratios = {
        "publish C / pwrite floor": publish["c"].median_us / publish["floor"].median_us,
        "publish C / one pwrite (floor)": publish["c"].median_us / publish["floor"].median_us,
        "checksum C / Python (16 MiB)": checksum["16384 KiB"]["c"] / checksum["16384 KiB"]["py"],
        "read 4 KiB Python / C": _ratio(read, f"{4 * KIB}-py", f"{4 * KIB}-c"),
        "read 256 KiB Python / C": _ratio(read, f"{DOC_256K}-py", f"{DOC_256K}-c"),
    }
    return {
        "dir": base_dir,
        "o_direct": direct,
        "publish": {k: asdict(v) for k, v in publish.items()},
        "checksum_gb_s": checksum,
        "read": {k: asdict(v) for k, v in read.items()},
        "ratios": ratios,
    }


def _print_markdown(res: Dict[str, object]) -> None:
    click.echo(f"disk directory: {res['dir']}  (reader O_DIRECT: {res['o_direct']})\n")
    click.echo("| measurement | median (us) | p99 (us) |")
    click.echo("|---|---|---|")
    for group in ("publish", "read"):
        rows = res[group]
        assert isinstance(rows, dict)
        for row in rows.values():
            p99 = f"{row['p99_us']:.1f}"
            click.echo(f"| {row['name']} | {row['median_us']:.1f} | {p99} |")
    click.echo("\n| checksum | C (GB/s) | Python (GB/s) |")
    click.echo("|---|---|---|")
    sums = res["checksum_gb_s"]
    assert isinstance(sums, dict)
    for size, row in sums.items():
        click.echo(f"| {size} | {row['c']:.2f} | {row['py']:.3f} |")
    click.echo("\n| ratio (same run) | value |")
    click.echo("|---|---|")
    ratios = res["ratios"]
    assert isinstance(ratios, dict)
    for name, value in ratios.items():
        click.echo(f"| {name} | {value:.2f} |")


@click.command()
@click.option(
    "--dir",
    "base_dir",
    default="/dev/shm",
    show_default=True,
    type=click.Path(file_okay=False, exists=True),
    help="Where to put the benchmark disks.",
)
@click.option("--repeat", default=7, show_default=True, help="Batches per throughput figure.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of Markdown tables.")
def main(base_dir: str, repeat: int, as_json: bool) -> None:
    """Measure publish, checksum and stable-read speed of the metrics disk."""
    res = run(base_dir, repeat)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        _print_markdown(res)


if __name__ == "__main__":
    main()
