"""vm-dump-metrics --watch in a real 80-column terminal (tmux): every value whole, on its line.

The disks are written by the daemon itself (`vhostmd --once` against
libvirt's test driver) from the shipped configuration (vhostmd.conf) and the
demo's (conf/demo.conf, with history, freshness, alarms and accounting), with
only their paths moved into the test's directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
from helpers import REPO

COLUMNS = 80
ROWS = 60


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _disk_from(config: Path, tmp: Path) -> Path:
    """Run one daemon cycle of CONFIG with its paths in TMP; the disk it wrote."""
    disk = tmp / "vhostmd0"
    text = config.read_text()
    for old, new in (("/dev/shm/vhostmd0", str(disk)),
                     ("/tmp/vhostmd-py-demo/vhostmd0", str(disk)),
                     ("/tmp/vhostmd-py-demo", str(tmp))):
        text = text.replace(old, new)
    # No TCP port in a test (the demo's endpoint has a fixed one).
    text = "\n".join(ln for ln in text.splitlines() if "<metrics_endpoint" not in ln)
    conf = tmp / config.name
    conf.write_text(text)
    shutil.copy(REPO / "vhostmd.dtd", tmp / "vhostmd.dtd")
    proc = subprocess.run([_bin("vhostmd"), "--once", "-f", str(conf), "-c", "test:///default"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return disk


def _values(disk: Path) -> List[Tuple[str, str]]:
    """(name, value as the table shows it) of every metric on DISK, read as JSON."""
    proc = subprocess.run([_bin("vm-dump-metrics"), "--disk", str(disk), "--format", "json"],
                          capture_output=True, text=True, timeout=30, check=True)
    data = json.loads(proc.stdout)
    metrics: List[Dict[str, object]] = [data["host"]] + [vm["metrics"] for vm in data["vms"]]
    out = []
    for group in metrics:
        for name, m in group.items():
            assert isinstance(m, dict)
            value = m["value"]
            shown = repr(value) if isinstance(value, float) else str(value)
            out.append((name, shown.replace("\n", "\\n")))
    return out


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[List[str]]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (scripts/setup-env installs it)")
    base = ["tmux", "-S", str(tmp_path / "tmux.sock")]  # a private server
    yield base
    subprocess.run([*base, "kill-server"], capture_output=True, timeout=10, check=False)


@pytest.mark.parametrize("config", ["vhostmd.conf", "conf/demo.conf"])
def test_watch_fits_80_columns_without_cutting_a_value(
    config: str, tmp_path: Path, tmux: List[str]
) -> None:
    """In an 80x60 tmux window each metric's whole value is on one line with its name."""
    disk = _disk_from(REPO / config, tmp_path)
    expected = _values(disk)
    env = {**os.environ, "TERM": "xterm"}
    started = subprocess.run(
        [*tmux, "new-session", "-d", "-x", str(COLUMNS), "-y", str(ROWS),
         f"{_bin('vm-dump-metrics')} --disk {disk} --watch 1"],
        capture_output=True, text=True, timeout=10, env=env, check=False)
    assert started.returncode == 0, started.stderr
    last = expected[-1][0]
    screen: List[str] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        screen = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True,
                                timeout=10, env=env, check=True).stdout.splitlines()
        if any(last in line for line in screen):
            break
        time.sleep(0.2)
    text = "\n".join(screen)
    assert all(len(line) <= COLUMNS for line in screen), text
    assert screen[0].startswith("vhostmd metrics at "), text
    for name, value in expected:
        rows = [line.strip() for line in screen if line.split()[:1] == [name]]
        assert rows, f"{name} not on the screen:\n{text}"
        assert any(f" {value}" in row[len(name):] or not value for row in rows), (
            f"{name}'s value {value!r} not whole on its line:\n{text}")
