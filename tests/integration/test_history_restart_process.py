"""A real daemon restarted with history on: no false dip in the rows after each (re)start.

libvirt's test driver counts a VM's received bytes from the clock (100,000
bytes per second exactly); the daemon runs at update_period 1, is stopped
(SIGTERM), started again, killed (SIGKILL) and started again. Every known
row of the finest archive of the VM's network rate must be the true rate
within the noise of reading a clock-driven counter at the cycle's time.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import List, Tuple

import rrdtool
from helpers.config import write_config
from helpers.daemon import Vhostmd

RATE = 100_000.0
NOISE = 0.05  # relative: the counter is read a few ms off the cycle's timestamp
RUN = 7.0


def _rows(path: Path, start: int, end: int) -> List[Tuple[int, float | None]]:
    (first, _, step), names, rows = rrdtool.fetch(str(path), "AVERAGE", "-r", "1",
                                                  "-s", str(start), "-e", str(end))
    col = list(names).index("net_rx")
    return [(first + (i + 1) * step, r[col]) for i, r in enumerate(rows)]


def test_restarts_leave_no_false_row(tmp_path: Path) -> None:
    """Start, SIGTERM, start, SIGKILL, start: every known row within noise of 100,000 B/s."""
    state = tmp_path / "history"
    conf = write_config(tmp_path / "vhostmd.conf", tmp_path / "disk",
                        [("One", "int32", "host", "echo 1")], period=1,
                        extra=f'<history state_dir="{state}"/>')
    begin = int(time.time())
    stops = []
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGTERM):
        daemon = Vhostmd(["-d", "-f", str(conf), "-c", "test:///default"], tmp_path)
        try:
            time.sleep(RUN)
            daemon.proc.send_signal(sig)
            daemon.proc.wait(10)
            stops.append(time.time())
        finally:
            daemon.close()
        time.sleep(1.3)
    files = list((state / "vm").glob("*.rrd"))
    assert len(files) == 1
    rows = _rows(files[0], begin - 2, int(stops[-1]) + 1)
    known = [(t, v) for t, v in rows if v is not None and not math.isnan(v)]
    worst = max(abs(v - RATE) / RATE for _, v in known)
    print(f"{len(rows)} rows, {len(known)} known, worst deviation {worst:.4%}")
    assert len(known) >= 3 * (RUN - 3), rows
    assert worst <= NOISE, rows
