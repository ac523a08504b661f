"""The RRD store: real rrdtool files, layout, restart continuity, retention, rrdcached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
import rrdtool
from helpers.history import (
    EXPECT_VM_CPU,
    UUID,
    VM_SCRIPT,
    WALL0,
    ScriptedClock,
    Tick,
    run_scripted,
    write_history_config,
)
from helpers.history import scripted_ticks as _ticks

from vhostmd_py.history.index import Index, VmEntry, read_index, write_index
from vhostmd_py.history.rrd import archive_layout
from vhostmd_py.stats import HostStats, VmStats


def _series(
    path: Path, ds: str, start: float, end: float, cf: str = "LAST"
) -> Dict[int, float | None]:
    """{end of interval: value} of one data source at the finest resolution."""
    (first, _, step), names, rows = rrdtool.fetch(
        str(path), cf, "-s", str(int(start)), "-e", str(int(end)), "-r", "5"
    )
    col = list(names).index(ds)
    return {first + (i + 1) * step: row[col] for i, row in enumerate(rows)}


def test_layout_of_the_files(tmp_path: Path) -> None:
    """One file for the host and one per VM; 4 CFs at 4 resolutions, XenServer's coverage."""
    state = tmp_path / "state"
    run_scripted(write_history_config(tmp_path / "c.xml", state), _ticks()[:2])
    vm_file = state / "vm" / f"{UUID}.rrd"
    assert (state / "host.rrd").is_file() and vm_file.is_file()
    info = rrdtool.info(str(vm_file))
    assert info["step"] == 5
    rras = sorted(
        (info[f"rra[{i}].cf"], info[f"rra[{i}].pdp_per_row"], info[f"rra[{i}].rows"])
        for i in range(16)
    )
    assert "rra[16].cf" not in info
    expected = sorted(
        (cf, steps, rows)
        for cf in ("AVERAGE", "MIN", "MAX", "LAST")
        for steps, rows in ((1, 120), (12, 120), (720, 168), (17280, 366))
    )
    assert rras == expected
    assert info["ds[cpu].max"] == 100.0 and info["ds[cpu].minimal_heartbeat"] == 10
    assert archive_layout(60) == ((1, 120), (60, 168), (1440, 366))
    assert archive_layout(1) == ((1, 600), (60, 120), (3600, 168), (86400, 366))


def test_rrd_holds_the_derived_values(tmp_path: Path) -> None:
    """The VM file's cpu at the update period equals the hand-computed CPU % of each cycle."""
    state = tmp_path / "state"
    run_scripted(write_history_config(tmp_path / "c.xml", state), _ticks())
    walls = [WALL0]
    for dt, *_ in VM_SCRIPT[1:]:
        walls.append(walls[-1] + dt)
    series = _series(state / "vm" / f"{UUID}.rrd", "cpu", WALL0 - 5, walls[-1])
    got = [series.get(int(w)) for w in walls]
    want = [None, *EXPECT_VM_CPU[1:]]
    assert got == [None if v is None else pytest.approx(v) for v in want]
    # The 25 s inside the gap are unknown, not a spike.
    assert all(series[int(walls[3]) + 5 * k] is None for k in range(1, 6))


def _steady(n: int, dt: float = 5.0, start_cpu: int = 0, vm_id: int = 1) -> List[Tick]:
    """N cycles of a VM using exactly 40 % of its 1 vCPU."""
    ticks = []
    for i in range(n):
        vm = VmStats(
            uuid=UUID,
            name="web1",
            id=vm_id,
            vcpus=1,
            cpu_time=start_cpu + int(i * dt * 0.4 * 10**9),
        )
        ticks.append(Tick(dt if i else 0.0, HostStats(), (vm,)))
    return ticks


def test_restart_continues_the_files_without_spike(tmp_path: Path) -> None:
    """A second daemon on the same state goes on in the same file: a gap of the downtime only."""
    state = tmp_path / "state"
    config = write_history_config(tmp_path / "c.xml", state)
    clock = ScriptedClock()
    run_scripted(config, _steady(4), clock)  # samples at +0..+15
    vm_file = state / "vm" / f"{UUID}.rrd"
    inode = vm_file.stat().st_ino
    clock.advance(20.0)  # downtime; the counter kept running (and the new run sees more)
    run_scripted(config, _steady(4, start_cpu=10 * 10**9), clock)  # samples at +35..+50
    assert vm_file.stat().st_ino == inode  # the same file, not a new one
    series = _series(vm_file, "cpu", WALL0 - 5, WALL0 + 50)
    known = {t - int(WALL0): v for t, v in series.items() if v is not None}
    assert known == {
        5: pytest.approx(40.0),
        10: pytest.approx(40.0),
        15: pytest.approx(40.0),
        40: pytest.approx(40.0),
        45: pytest.approx(40.0),
        50: pytest.approx(40.0),
    }


def test_index_and_retention(tmp_path: Path) -> None:
    """Names go to index.json; a VM gone for longer than the retention loses its file."""
    state = tmp_path / "state"
    config = write_history_config(tmp_path / "c.xml", state, retention="30s")
    ticks = [*_steady(3), Tick(5.0, HostStats(), ())]  # seen at +0..+10, gone at +15
    run_scripted(config, ticks, ScriptedClock())
    index = read_index(state)
    assert index.vms[UUID].name == "web1" and index.step == 5
    assert index.vms[UUID].last_seen == WALL0 + 10  # the last cycle it was seen
    assert (state / "vm" / f"{UUID}.rrd").exists()
    clock = ScriptedClock(WALL0 + 15, 1015.0)
    run_scripted(config, [Tick(5.0, HostStats(), ()) for _ in range(5)], clock)  # up to +40
    assert (state / "vm" / f"{UUID}.rrd").exists()  # gone 30 s: kept
    run_scripted(config, [Tick(5.0, HostStats(), ())], clock)  # +45: gone 35 s
    assert not (state / "vm" / f"{UUID}.rrd").exists()
    assert UUID not in read_index(state).vms
    assert json.loads((state / "index.json").read_text())["version"] == 1


def test_index_write_is_atomic_and_json(tmp_path: Path) -> None:
    """The index is replaced whole; no temporary file stays behind."""
    write_index(tmp_path, Index({"u1": VmEntry("a", 1.5)}, 5, None))
    write_index(tmp_path, Index({"u1": VmEntry("b", 2.5)}, 5, "unix:/x"))
    assert sorted(os.listdir(tmp_path)) == ["index.json"]
    index = read_index(tmp_path)
    assert index.vms["u1"] == VmEntry("b", 2.5) and index.rrdcached == "unix:/x"


@pytest.fixture
def rrdcached(tmp_path: Path) -> Iterator[str]:
    """A real rrdcached on a private UNIX socket (skipped when the binary is missing)."""
    binary = shutil.which("rrdcached") or "/usr/bin/rrdcached"
    if not os.path.exists(binary):
        pytest.skip("rrdcached not installed (scripts/setup-env installs it)")
    sock = tmp_path / "rrdcached.sock"
    journal = tmp_path / "journal"
    journal.mkdir()
    proc = subprocess.Popen(
        [
            binary,
            "-g",
            "-l",
            f"unix:{sock}",
            "-j",
            str(journal),
            "-w",
            "3600",
            "-p",
            str(tmp_path / "rrdcached.pid"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "rrdcached did not start"
            time.sleep(0.02)
        yield f"unix:{sock}"
    finally:
        proc.terminate()
        proc.wait(5)


def test_updates_through_rrdcached(tmp_path: Path, rrdcached: str) -> None:
    """With rrdcached (write delay 1 h) the values reach the file by close()'s flush."""
    state = tmp_path / "state"
    config = write_history_config(tmp_path / "c.xml", state, extra=f' rrdcached="{rrdcached}"')
    run_scripted(config, _steady(4))
    series = _series(state / "vm" / f"{UUID}.rrd", "cpu", WALL0 - 5, WALL0 + 15)
    assert [series[int(WALL0) + k] for k in (5, 10, 15)] == [pytest.approx(40.0)] * 3
    assert read_index(state).rrdcached == rrdcached


def test_bytes_per_vm_file(tmp_path: Path) -> None:
    """The documented footprint: a VM file at update_period 5 is 238,712 bytes (233 KiB)."""
    state = tmp_path / "state"
    run_scripted(write_history_config(tmp_path / "c.xml", state), _steady(1))
    size = (state / "vm" / f"{UUID}.rrd").stat().st_size
    rows = sum(r for _, r in archive_layout(5)) * 4  # 4 CFs
    assert rows * 9 * 8 < size < rows * 9 * 8 + 32768  # 9 data sources of 8 bytes, plus headers
    assert size == 238712
