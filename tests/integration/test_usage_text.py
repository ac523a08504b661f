"""vhostmd -h: upstream's usage (stderr, exit 2: the golden help) ends with text, not a heading."""

from __future__ import annotations

import subprocess
import sys


def test_usage_does_not_end_with_an_empty_heading() -> None:
    """Upstream's last heading, "Host metrics gathering daemon:", is followed by what it heads."""
    proc = subprocess.run([sys.executable, "-m", "vhostmd_py.cli", "-h"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
    assert not lines[-1].endswith(":"), lines[-3:]
    heading = lines.index("Host metrics gathering daemon:")
    assert heading < len(lines) - 1 and "vhostmd(8)" in " ".join(lines[heading + 1:])
