"""The real-guest e2e's value checks: what scripts/e2e/host-values.py recorded.

OUT/values.jsonl holds `sample` records (libvirt per-domain reading A, the
E2ENative* values of the metrics document published after A, reading B) and
`marker` records (host wall time at which a console marker of the full guest
appeared). The history is read back with vhostmdctl, as an operator would.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

NATIVE_PREFIX = "E2ENative"  # the built-in-source metrics of scripts/e2e/host-vhostmd.conf


def load_values(out: Path) -> Tuple[List[Dict[str, Any]], Dict[str, float]]:
    """(samples, markers 'CONSOLE:MARKER' -> host wall time) of a run."""
    samples: List[Dict[str, Any]] = []
    markers: Dict[str, float] = {}
    errors: List[str] = []
    for line in (out / "values.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "sample":
            samples.append(rec)
        elif rec["kind"] == "marker":
            markers[rec["key"]] = rec["wall"]
        else:
            errors.append(rec.get("error", ""))
    assert not errors, errors
    return samples, markers


def cpu_share(out: Path, console: str, start: str, end: str, vm: str) -> float:
    """VM's CPU % per vCPU between two console markers, from libvirt's own CPU time.

    host-values.py reads every domain's CPU time (the bulk call, the cgroup's
    nanoseconds) when it sees each marker: what the guest really got, whatever
    else the machine was doing."""
    recs = {}
    for line in (out / "values.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "marker":
            recs[rec["key"]] = rec
    a, b = recs.get(f"{console}:{start}"), recs.get(f"{console}:{end}")
    assert a is not None and b is not None, f"markers {start}/{end} of {console} not seen"
    ca, cb = a.get("cpu", {}).get(vm), b.get("cpu", {}).get(vm)
    assert ca and cb, f"no CPU time of {vm} at the markers: {a}, {b}"
    seconds = b["wall"] - a["wall"]
    return 100.0 * (cb["cpu_time"] - ca["cpu_time"]) / (seconds * 1e9 * ca["vcpus"])


def marker(markers: Dict[str, float], console: str, name: str) -> float:
    """Host wall time of a marker of a console file (name-console.log)."""
    key = f"{console}:{name}"
    assert key in markers, f"{key} never appeared (seen: {sorted(markers)})"
    return markers[key]


def vhostmdctl(*args: str) -> subprocess.CompletedProcess[str]:
    """The operator's command, from this interpreter (as installed: vhostmd_py.ctl.main)."""
    return subprocess.run(
        [sys.executable, "-m", "vhostmd_py.ctl.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def cpu_history(state_dir: Path, vm: str) -> Dict[str, Any]:
    """`vhostmdctl history --vm VM --metric cpu --since 10m --format json`, parsed."""
    proc = vhostmdctl(
        "--state-dir", str(state_dir), "history", "--vm", vm, "--metric", "cpu",
        "--since", "10m", "--format", "json",
    )
    assert proc.returncode == 0, proc.stderr
    doc: Dict[str, Any] = json.loads(proc.stdout)
    return doc


def window_stats(doc: Dict[str, Any], start: float, end: float) -> Dict[str, Any]:
    """Known CPU % rows whose interval lies in [start, end]: count, mean, min, max."""
    step = doc["step"]
    vals = [
        r["cpu"]
        for r in doc["rows"]
        if r["time"] - step >= start and r["time"] <= end and r["cpu"] is not None
    ]
    if not vals:
        return {"step": step, "known": 0}
    return {
        "step": step,
        "known": len(vals),
        "mean": round(statistics.fmean(vals), 1),
        "min": round(min(vals), 1),
        "max": round(max(vals), 1),
    }


def png_size(path: Path) -> Tuple[int, int]:
    """(width, height) from a PNG's IHDR; fails on anything that is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", head[:8]
    assert head[12:16] == b"IHDR", head[12:16]
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
