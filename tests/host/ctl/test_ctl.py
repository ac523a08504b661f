"""vhostmdctl: the real command in a subprocess, on a state directory the daemon wrote."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
import rrdtool
from helpers.history import UUID, WALL0, ScriptedClock, Tick, run_scripted, write_history_config

from vhostmd_py.sources.stats import BlockStats, HostStats, NetStats, VmStats

END = int(WALL0) + 60


def _ticks(n: int = 13) -> List[Tick]:
    """N cycles, 5 s apart: 1 vCPU at 40 %, 2000 B/s in, 500 B/s out, 4096 B/s written."""
    ticks = []
    for i in range(n):
        vm = VmStats(
            uuid=UUID, name="web1", id=1, vcpus=1, cpu_time=i * 2 * 10**9,
            nics=(NetStats("vnet0", rx_bytes=i * 10000, tx_bytes=i * 2500),),
            disks=(BlockStats("vda", rd_bytes=0, wr_bytes=i * 20480),),
        )
        host = HostStats(cpus=1, cpu_ticks={"user": i * 100, "system": 0, "idle": i * 400})
        ticks.append(Tick(5.0 if i else 0.0, host, (vm,)))
    return ticks


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory written by the daemon over one minute."""
    root = tmp_path_factory.mktemp("ctl")
    run_scripted(write_history_config(root / "c.xml", root / "state"), _ticks())
    return root / "state"


def ctl(*args: str) -> Tuple[int, str, str]:
    """Run vhostmdctl; (status, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "vhostmd_py.ctl.main", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_history_json_by_name(state: Path) -> None:
    """--vm by name, JSON: the last minute of CPU % at the update period."""
    status, out, err = ctl("--state-dir", str(state), "history", "--vm", "web1", "--metric",
                           "cpu", "--since", "60s", "--end", str(END), "--format", "json")
    assert status == 0, err
    doc = json.loads(out)
    assert doc["uuid"] == UUID and doc["step"] == 5 and doc["units"] == ["%"]
    values = [r["cpu"] for r in doc["rows"]]
    assert values[-12:] == [pytest.approx(40.0)] * 12


def test_history_csv_net_and_table(state: Path) -> None:
    """net gives rx and tx columns; the table marks unknown rows with '-'."""
    status, out, _ = ctl("--state-dir", str(state), "history", "--vm", UUID, "--metric", "net",
                         "--since", "30s", "--end", str(END), "--format", "csv")
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "time,net_rx,net_tx"
    assert lines[-1] == f"{END},2000.00,500.00"
    status, out, _ = ctl("--state-dir", str(state), "history", "--vm", "host", "--metric",
                         "cpu", "--cf", "MAX", "--since", "70s", "--end", str(END))
    assert status == 0
    assert "20.00" in out and " -" in out  # 100 of 500 ticks busy; before the first sample


def test_errors_are_clear(state: Path, tmp_path: Path) -> None:
    """Unknown VM, unknown metric, missing state directory: one line, status 1."""
    status, _, err = ctl("--state-dir", str(state), "history", "--vm", "nosuch", "--metric",
                         "cpu")
    assert status == 1 and "no history for VM 'nosuch'" in err
    status, _, err = ctl("--state-dir", str(state), "history", "--vm", "host", "--metric", "net")
    assert status == 1 and "unknown metric 'net'" in err and "load" in err
    status, _, err = ctl("--state-dir", str(tmp_path / "none"), "history", "--vm", "host",
                         "--metric", "cpu")
    assert status == 1 and "state directory does not exist" in err
    status, _, err = ctl("--state-dir", str(state), "history", "--vm", "host", "--metric", "cpu",
                         "--since", "yesterday")
    assert status == 2 and "--since" in err


def test_list(state: Path) -> None:
    """list shows UUID, last seen and name."""
    status, out, _ = ctl("--state-dir", str(state), "list")
    assert status == 0 and out.split() == [UUID, "2023-11-14T22:14:20Z", "web1"]


def _png_size(path: Path) -> Tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.mark.parametrize(("metric", "period", "size"),
                         [("cpu", "day", (640, 240)), ("net", "week", (500, 180)),
                          ("disk", "month", (800, 300))])
def test_graph_is_a_png_of_the_requested_size(
    state: Path, tmp_path: Path, metric: str, period: str, size: Tuple[int, int]
) -> None:
    """graph writes a PNG exactly --width x --height."""
    out = tmp_path / f"{metric}.png"
    status, _, err = ctl("--state-dir", str(state), "graph", "--vm", "web1", "--metric", metric,
                         "--period", period, "-o", str(out), "--width", str(size[0]),
                         "--height", str(size[1]), "--end", str(END))
    assert status == 0, err
    assert _png_size(out) == size


def test_graph_of_the_host_has_cpu_only(state: Path, tmp_path: Path) -> None:
    """The host file has no network: a clear error, no file."""
    out = tmp_path / "h.png"
    status, _, err = ctl("--state-dir", str(state), "graph", "--vm", "host", "--metric", "net",
                         "-o", str(out))
    assert status == 1 and "unknown metric 'net'" in err and not out.exists()


# A VM that ran for 15 minutes, from a 5-minute boundary: 20 %, then 60 %, then 40 % CPU.
T0 = 1_700_000_100  # a multiple of 300
SEGMENTS = (20.0, 60.0, 40.0)


def _short_run() -> List[Tick]:
    """181 cycles, 5 s apart (+0..+900): cycle i's CPU % is SEGMENTS[(i - 1) // 60]."""
    ticks, cpu_time = [], 0
    for i in range(181):
        if i:
            cpu_time += int(5 * SEGMENTS[(i - 1) // 60] / 100 * 10**9)
        vm = VmStats(uuid=UUID, name="short", id=1, vcpus=1, cpu_time=cpu_time)
        ticks.append(Tick(5.0 if i else 0.0, HostStats(), (vm,)))
    return ticks


def test_day_graph_of_a_vm_that_ran_for_15_minutes(tmp_path: Path) -> None:
    """The day graph draws from the 5-minute archive: 3 known rows, 20, 60, 40 %.

    With XenServer's archives alone it drew from the 1-hour one, where 15 minutes
    of an hour are unknown (xff 0.5): an empty graph.
    """
    state = tmp_path / "state"
    run_scripted(write_history_config(tmp_path / "c.xml", state), _short_run(),
                 ScriptedClock(float(T0)))
    end = T0 + 1200
    out = tmp_path / "day.png"
    status, _, err = ctl("--state-dir", str(state), "graph", "--vm", "short", "--metric", "cpu",
                         "--period", "day", "-o", str(out), "--end", str(end))
    assert status == 0, err
    assert _png_size(out) == (600, 200)

    # rrdtool's own reading, with vhostmdctl's DEF, range and size: the step the graph
    # draws at (STEPWIDTH) and what it draws.
    vm_file = str(state / "vm" / f"{UUID}.rrd")
    _, _, prints = rrdtool.graph(
        "/dev/null", "--full-size-mode", "--width", "600", "--height", "200",
        "--start", str(end - 86400), "--end", str(end),
        f"DEF:cpu={vm_file}:cpu:AVERAGE", "CDEF:step=cpu,POP,STEPWIDTH",
        "VDEF:s=step,MAXIMUM", "VDEF:lo=cpu,MINIMUM", "VDEF:hi=cpu,MAXIMUM",
        "VDEF:first=cpu,FIRST", "VDEF:last=cpu,LAST",
        "PRINT:s:%.0lf", "PRINT:lo:%.2lf", "PRINT:hi:%.2lf",
        "PRINT:first:%.2lf", "PRINT:last:%.2lf",
    )
    assert prints == ["300", "20.00", "60.00", "20.00", "40.00"]

    # The same DEF fetched at that resolution: the three 5-minute rows, nothing else.
    (first, _, step), names, rows = rrdtool.fetch(
        vm_file, "AVERAGE", "-r", "300", "-s", str(end - 86400), "-e", str(end)
    )
    assert step == 300
    col = list(names).index("cpu")
    known = {first + (i + 1) * step - T0: r[col] for i, r in enumerate(rows) if r[col] is not None}
    assert known == {300: pytest.approx(20.0), 600: pytest.approx(60.0), 900: pytest.approx(40.0)}
    # What the day graph drew before: the 1-hour rows are all unknown.
    (_, _, step), _, hourly = rrdtool.fetch(
        vm_file, "AVERAGE", "-r", "3600", "-s", str(end - 86400), "-e", str(end)
    )
    assert step == 3600 and all(r[col] is None for r in hourly)


def test_version() -> None:
    """--version: the package's version on stdout, exit 0."""
    import vhostmd_py

    code, out, err = ctl("--version")
    assert (code, out, err) == (0, f"vhostmdctl (vhostmd-py) {vhostmd_py.__version__}\n", "")
