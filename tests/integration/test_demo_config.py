"""The quick start's config (conf/demo.conf): alarms and accounting answer after one cycle.

The demo's paths are moved into the test's directory and its endpoint (a
fixed port) left out; otherwise it is the file scripts/run uses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import REPO


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def test_demo_shows_alarms_and_accounting(tmp_path: Path) -> None:
    """One --once cycle of the demo: vhostmdctl alarms has the demo alarm, usage the VM."""
    text = (REPO / "conf" / "demo.conf").read_text().replace("/tmp/vhostmd-py-demo", str(tmp_path))
    text = "\n".join(ln for ln in text.splitlines() if "<metrics_endpoint" not in ln)
    conf = tmp_path / "demo.conf"
    conf.write_text(text)
    shutil.copy(REPO / "vhostmd.dtd", tmp_path / "vhostmd.dtd")
    run = subprocess.run([_bin("vhostmd"), "--once", "-f", str(conf), "-c", "test:///default"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    state = str(tmp_path / "state")

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_bin("vhostmdctl"), "--state-dir", state, *args],
                              capture_output=True, text=True, timeout=60, check=False)

    alarms = ctl("alarms", "--format", "json")
    assert alarms.returncode == 0, alarms.stderr
    active = json.loads(alarms.stdout)["active"]
    assert [(a["object"], a["variable"]) for a in active] == [("host", "memory_free_kib")], active
    usage = ctl("usage", "--format", "json")
    assert usage.returncode == 0, usage.stderr
    assert "test" in usage.stdout and "1073741824" in usage.stdout, usage.stdout
    # The guests see them too (guest_metrics="yes").
    dump = subprocess.run([_bin("vm-dump-metrics"), "--disk", str(tmp_path / "vhostmd0")],
                          capture_output=True, text=True, timeout=30, check=False)
    assert dump.returncode == 0, dump.stderr
    for name in ("AlarmActive", "AccountingTxBudget", "HostIdentity"):
        assert f"<name>{name}</name>" in dump.stdout, name
