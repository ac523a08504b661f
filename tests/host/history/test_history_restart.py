"""No false value after a (re)start: every known RRD row is a rate computed from real samples.

rrdtool counts the unknown part of a step in whole seconds: a known value
that starts in the middle of a step (the first rate after a start, a
restart or any unknown stretch) used to be diluted by the fraction of the
step before it (100,000 B/s drawn as 29,000 or 1,300). Counters here grow at
exactly 100,000 B/s, cycles fall at fractional times; after each restart
every row of the finest archive is either unknown or 100,000.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Tuple

import pytest
import rrdtool

from vhostmd_py.config import HistoryConfig
from vhostmd_py.history.core import History
from vhostmd_py.sources.stats import CycleStats, HostStats, NetStats, VmStats

UUID = "00000000-0000-4000-8000-0000000000c1"
RATE = 100_000.0


def _snap(wall: float) -> CycleStats:
    nic = NetStats("vnet0", rx_bytes=int(RATE * wall), tx_bytes=int(RATE * wall / 2))
    vm = VmStats(uuid=UUID, name="web", id=1, vcpus=1, cpu_time=int(wall * 0.25e9), nics=(nic,))
    return CycleStats(wall=wall, mono=wall, host=HostStats(), vms=(vm,))


def _run(state: Path, walls: List[float], period: int) -> None:
    history = History(HistoryConfig(state_dir=str(state)), update_period=period, threaded=False)
    for wall in walls:
        history.observe(_snap(wall))
    history.close()


def _rows(path: Path, start: int, end: int) -> List[Tuple[int, float | None]]:
    (first, _, step), names, rows = rrdtool.fetch(str(path), "AVERAGE", "-r", "1",
                                                  "-s", str(start), "-e", str(end))
    col = list(names).index("net_rx")
    return [(first + (i + 1) * step, r[col]) for i, r in enumerate(rows)]


@pytest.mark.parametrize("offset", [0.013, 0.29, 0.5, 0.987])
@pytest.mark.parametrize("downtime", [0.4, 3.0, 30.0])
def test_rows_after_each_restart_are_true_or_unknown(
    tmp_path: Path, offset: float, downtime: float
) -> None:
    """Three runs (start, two restarts) at fractional times: no row below the true rate."""
    t0 = 1_700_000_000 + offset
    walls = [t0 + i + (0.002 if i % 3 else -0.003) for i in range(12)]
    _run(tmp_path, walls, 1)
    t1 = walls[-1] + downtime
    walls2 = [t1 + i * 1.001 for i in range(12)]
    _run(tmp_path, walls2, 1)
    t2 = walls2[-1] + downtime + 0.37
    walls3 = [t2 + i * 0.999 for i in range(12)]
    _run(tmp_path, walls3, 1)
    rows = _rows(tmp_path / "vm" / f"{UUID}.rrd", int(t0) - 2, int(walls3[-1]))
    known = [(t, v) for t, v in rows if v is not None and not math.isnan(v)]
    assert len(known) >= 24, rows
    off = [(t, v) for t, v in known if abs(v - RATE) > 1e-4 * RATE]  # whole bytes
    assert off == [], rows


def test_a_value_right_after_a_gap_is_kept_when_a_step_boundary_lies_before_it(
    tmp_path: Path,
) -> None:
    """Unknown, then known: only the step holding the switch is unknown, the next is known."""
    walls = [1_700_000_000.4, 1_700_000_001.4, 1_700_000_002.4, 1_700_000_003.4]
    _run(tmp_path, walls, 1)
    rows = dict(_rows(tmp_path / "vm" / f"{UUID}.rrd", 1_699_999_999, 1_700_000_003))
    # 0..1 holds the switch from unknown (the first sample at .4): unknown; 1..2 is whole.
    assert rows[1_700_000_001] is None
    assert rows[1_700_000_002] == rows[1_700_000_003] == pytest.approx(RATE, rel=1e-4)
