"""Benchmark of the guest side: read + verify + parse, cached lookups, vm-dump-metrics -b.

The guest is pure Python (vhostmd_wire: stable read with an mmap buffer,
expat parsing); where the host's C extension and lxml exist (on a host,
here), the same read and parse are timed with them too, so the ratios say
what the stdlib-only guest costs.

Run:  .venv/bin/python bench/bench_guest.py [--dir DIR] [--runs 15] [--json]

All figures come from one run, so their ratios are comparable; absolute
times depend on the machine. Disks are written by the host writer
(vhostmd_py.publish.mdisk.MetricsDisk) into --dir (default: a temporary directory
on the root filesystem, where O_DIRECT works like on a guest's virtio disk).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import click
from lxml import etree
from vhostmd_guest.document import MetricContext, parse_document
from vhostmd_guest.reader import DiskSource, MetricsReader, fetch_disk_metrics, read_disk_content
from vhostmd_wire import disk as wire

from vhostmd_py.publish import mdisk

# C's stable-read attempt is test-only C (csrc/tests/mdisk_read.c), built by
# the tests' helper on first use; guests read in pure Python.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.cread import CReadStrategy

from vhostmd_py.safexml import safe_parser

KIB = 1024


def _document(target: int, vms: int = 4) -> bytes:
    """A vhostmd-layout document of about `target` bytes: host metrics, then `vms` VMs."""
    out = ["<metrics>\n"]
    host = (
        "  <metric type='uint64' context='host'>\n    <name>Host{}</name>\n"
        "    <value>{}</value>\n  </metric>\n"
    )
    vm = (
        "  <metric type='real64' context='vm' id='{id}' uuid='{uuid}'>\n"
        "    <name>Metric{n}</name>\n    <value>{n}.5</value>\n  </metric>\n"
    )
    size, n = len(out[0]) + len("</metrics>\n"), 0
    while size < target:
        if n % 2 == 0:
            piece = host.format(n, n * 1000)
        else:
            i = (n // 2) % vms + 1
            piece = vm.format(id=i, uuid=f"00000000-0000-4000-8000-{i:012d}", n=n)
        if size + len(piece) > target:
            break
        out.append(piece)
        size += len(piece)
        n += 1
    out.append("</metrics>\n")
    return "".join(out).encode()


def _samples(fn: Callable[[], object], calls: int) -> List[float]:
    """Microseconds of each of `calls` single calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return times


def _row(name: str, times: List[float]) -> Dict[str, object]:
    times = sorted(times)
    return {
        "name": name,
        "calls": len(times),
        "median_us": statistics.median(times),
        "p99_us": times[min(len(times) - 1, int(len(times) * 0.99))],
    }


def _tool() -> List[str]:
    script = Path(sys.executable).parent / "vm-dump-metrics"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vhostmd_guest"]


def _wall(cmd: List[str], runs: int) -> List[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def run(base: Path, runs: int) -> Dict[str, object]:
    """Every measurement, one run."""
    rows: List[Dict[str, object]] = []
    disks = {}
    for label, size in (("4 KiB", 4 * KIB), ("256 KiB", 256 * KIB)):
        path = base / f"disk-{size}"
        disk = mdisk.MetricsDisk.create(path, size)
        disk.publish(_document(size - 16))
        disk.close()
        disks[label] = path
        content = read_disk_content(path)
        calls = 2000 if size <= 4 * KIB else 300
        rows.append(
            _row(
                f"stable read {label} (open, O_DIRECT, verify)",
                _samples(lambda p=path: read_disk_content(p), calls),
            )
        )
        rows.append(
            _row(
                f"parse {label} ({len(parse_document(content))} metrics)",
                _samples(lambda c=content: parse_document(c), calls),
            )
        )
        rows.append(
            _row(
                f"C stable read {label} (same retry policy, C attempt)",
                _samples(lambda p=path: wire.read_disk(p, strategy=CReadStrategy()), calls),
            )
        )
        rows.append(
            _row(
                f"lxml parse {label} (hardened lxml parser, tree only)",
                _samples(lambda c=content: etree.fromstring(c, safe_parser()), calls),
            )
        )
        rows.append(
            _row(
                f"read + verify + parse {label}",
                _samples(
                    lambda p=path: parse_document(fetch_disk_metrics(DiskSource(path=str(p)))[1]),
                    calls,
                ),
            )
        )
    big = disks["256 KiB"]
    reader = MetricsReader(
        DiskSource(path=str(big)), vm_uuid="00000000-0000-4000-8000-000000000002"
    )
    doc = reader.read()
    rows.append(
        _row(
            "get_metric, cached (stable read + compare + lookup), 256 KiB disk",
            _samples(lambda: reader.get("Metric3", MetricContext.VM), 3000),
        )
    )
    rows.append(
        _row(
            "lookup only (document in memory), 256 KiB disk",
            _samples(lambda: reader.get("Metric3", MetricContext.VM, document=doc), 3000),
        )
    )
    uncached = _samples(
        lambda: MetricsReader(DiskSource(path=str(big)), vm_uuid="x").get("Host0"), 200
    )
    rows.append(_row("get_metric, fresh reader (read + parse), 256 KiB disk", uncached))
    assert reader.parses == 1, "the cache re-parsed an unchanged disk"
    cli = _wall([*_tool(), "-b", "--disk", str(big)], runs)
    rows.append(_row("vm-dump-metrics -b, 256 KiB disk (process wall)", cli))
    startup = _wall([*_tool(), "--help"], runs)
    rows.append(_row("vm-dump-metrics --help (process wall: start-up only)", startup))
    bare = _wall([sys.executable, "-c", "pass"], runs)
    rows.append(_row("python -c pass (interpreter floor)", bare))
    med = {str(r["name"]): float(r["median_us"]) for r in rows}  # type: ignore[arg-type]

    def m(prefix: str) -> float:
        return next(v for k, v in med.items() if k.startswith(prefix))

    ratios = {
        "stable read, pure Python / C, 4 KiB": m("stable read 4") / m("C stable read 4"),
        "stable read, pure Python / C, 256 KiB": m("stable read 256") / m("C stable read 256"),
        "parse (expat + metrics) / lxml tree, 4 KiB": m("parse 4") / m("lxml parse 4"),
        "parse (expat + metrics) / lxml tree, 256 KiB": m("parse 256") / m("lxml parse 256"),
        "read+verify+parse 256 KiB / 4 KiB": m("read + verify + parse 256")
        / m("read + verify + parse 4"),
        "parse / stable read, 256 KiB": m("parse 256") / m("stable read 256"),
        "fresh get_metric / cached get_metric": m("get_metric, fresh") / m("get_metric, cached"),
        "cached get_metric / lookup only": m("get_metric, cached") / m("lookup only"),
        "vm-dump-metrics -b / --help (work share)": m("vm-dump-metrics -b")
        / m("vm-dump-metrics --help"),
        "vm-dump-metrics --help / python -c pass": m("vm-dump-metrics --help") / m("python -c"),
    }
    return {"dir": str(base), "rows": rows, "ratios": ratios}


def _print(res: Dict[str, object]) -> None:
    click.echo(f"disk directory: {res['dir']}\n")
    click.echo("| measurement | median (us) | p99 (us) |")
    click.echo("|---|---|---|")
    for row in res["rows"]:  # type: ignore[attr-defined]
        click.echo(f"| {row['name']} | {row['median_us']:.1f} | {row['p99_us']:.1f} |")
    click.echo("\n| ratio (same run) | value |")
    click.echo("|---|---|")
    for name, value in res["ratios"].items():  # type: ignore[attr-defined]
        click.echo(f"| {name} | {value:.2f} |")


@click.command()
@click.option(
    "--dir",
    "base_dir",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Where to put the disks (default: a temporary dir under /var/tmp).",
)
@click.option("--runs", default=15, show_default=True, help="Process runs per CLI figure.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of Markdown tables.")
def main(base_dir: str, runs: int, as_json: bool) -> None:
    """Measure the guest side's read, parse, lookup and CLI costs."""
    base = Path(tempfile.mkdtemp(prefix="bench-guest-", dir=base_dir or "/var/tmp"))
    try:
        res = run(base, runs)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        _print(res)
    os.sync()


if __name__ == "__main__":
    main()
