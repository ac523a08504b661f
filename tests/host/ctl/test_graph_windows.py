"""vhostmdctl graph: windows from minutes to a year, clipped to the data, nova's log scale."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
import rrdtool

from vhostmd_py.config import HistoryConfig
from vhostmd_py.ctl.history import graph, open_state, resolve
from vhostmd_py.history.core import History
from vhostmd_py.sources.stats import BlockStats, CycleStats, HostStats, NetStats, VmStats

UUID = "00000000-0000-4000-8000-0000000000d1"
T0 = 1_700_000_000


def _record(state: Path, period: int, cycles: int, rx_rate: float = 50_000.0) -> int:
    """CYCLES cycles PERIOD s apart of a VM at 25 % CPU; the last cycle's time.

    The VM receives RX_RATE bytes/s in even hours and 1 % of it in odd ones
    (the logarithmic scale shows both).
    """
    history = History(HistoryConfig(state_dir=str(state)), update_period=period, threaded=False)
    wall, rx = float(T0), 0
    for i in range(cycles):
        wall = T0 + i * period + 0.25
        if i:
            rx += int(period * (rx_rate if (i * period // 3600) % 2 == 0 else rx_rate / 100))
        vm = VmStats(
            uuid=UUID, name="web", id=1, vcpus=1, cpu_time=int(wall * 0.25e9),
            nics=(NetStats("vnet0", rx_bytes=rx, tx_bytes=int(wall * 100)),),
            disks=(BlockStats("vda", rd_bytes=0, wr_bytes=int(wall * 4096)),),
        )
        host = HostStats(cpus=1, cpu_ticks={"user": i * period * 25, "system": 0,
                                            "idle": i * period * 75})
        history.observe(CycleStats(wall=wall, mono=wall, host=host, vms=(vm,)))
    history.close()
    return int(wall)


def _png_size(path: Path) -> Tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _stepwidth(path: Path, ds: str, start: int, end: int) -> Tuple[int, int]:
    """(seconds per drawn point, known points) of rrdtool's graph of DS over START..END."""
    _, _, prints = rrdtool.graph(
        "/dev/null", "--full-size-mode", "--width", "600", "--height", "200",
        "--start", str(start), "--end", str(end),
        f"DEF:v={path}:{ds}:AVERAGE", "CDEF:s=v,POP,STEPWIDTH", "CDEF:k=v,UN,0,1,IF",
        "VDEF:w=s,MAXIMUM", "VDEF:n=k,TOTAL", "PRINT:w:%.0lf", "PRINT:n:%.0lf",
    )
    return int(prints[0]), int(prints[1])


def test_new_host_default_window_shows_its_five_minutes(tmp_path: Path) -> None:
    """5 minutes at update_period 1, default window (1 day): clipped, drawn at 1 s per point."""
    state = tmp_path / "state"
    end = _record(state, 1, 300) + 1
    st = open_state(str(state), None)
    target = resolve(st, "host")
    out = tmp_path / "host.png"
    start, drawn = graph(st, target, "cpu", 86400, str(out), 600, 200, end)
    assert T0 - 2 <= start <= T0 + 2  # where the data begins, not a day ago
    assert _png_size(out) == (600, 200)
    step, known = _stepwidth(Path(target.path), "cpu", start, end)
    assert step == 1 and known >= 295
    # The unclipped day window: the 5-minute archive, one row at most (the old graph).
    step, known = _stepwidth(Path(target.path), "cpu", end - 86400, end)
    assert step == 300 and known <= 300
    assert drawn["image_width"] == 600


def test_25_hours_and_a_year(tmp_path: Path) -> None:
    """25 h at update_period 10: --since 25h draws 5-minute rows; log scale from 1000 B/s."""
    state = tmp_path / "state"
    end = _record(state, 10, 25 * 360) + 1
    st = open_state(str(state), None)
    target = resolve(st, "web")
    out = tmp_path / "net.png"
    start, drawn = graph(st, target, "net", 25 * 3600, str(out), 800, 300, end)
    assert start == end - 25 * 3600
    assert _png_size(out) == (800, 300)
    assert drawn["value_min"] == 1000.0  # nova: --logarithmic --lower-limit 1000 --rigid
    step, known = _stepwidth(Path(target.path), "net_rx", start, end)
    assert step == 300 and known >= 290
    _, linear = graph(st, target, "net", 25 * 3600, str(tmp_path / "lin.png"), 800, 300, end,
                      scale="linear")
    assert linear["value_min"] == 0.0
    # A year: the whole file, clipped to its 25 hours.
    start, _ = graph(st, target, "cpu", 366 * 86400, str(tmp_path / "year.png"), 600, 200, end)
    assert T0 - 3600 <= start <= T0 + 600


def _ctl(*args: str) -> Tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "vhostmd_py.ctl.main", *args],
                          capture_output=True, text=True, timeout=60, check=False)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--since", "5x"], "not a duration"),
    (["--since", "30s"], "outside"),
    (["--since", "400d"], "outside"),
    (["--since", "1d", "--period", "day"], "not both"),
])
def test_bad_windows_are_refused(tmp_path: Path, args: List[str], message: str) -> None:
    """A window that is not a duration, too short, too long, or given twice: usage error."""
    status, _, err = _ctl("--state-dir", str(tmp_path), "graph", "--vm", "host", "--metric",
                          "cpu", "-o", str(tmp_path / "x.png"), *args)
    assert status == 2 and message in err, err


def test_command_line_minutes_window(tmp_path: Path) -> None:
    """--since 5m through the command, no rrdtool tag argument refused by rrdtool."""
    state = tmp_path / "state"
    end = _record(state, 1, 200) + 1
    out = tmp_path / "m.png"
    status, printed, err = _ctl("--state-dir", str(state), "graph", "--vm", "web", "--metric",
                                "disk", "--since", "5m", "--end", str(end), "-o", str(out))
    assert status == 0, err
    assert printed.strip() == str(out) and _png_size(out) == (600, 200)
