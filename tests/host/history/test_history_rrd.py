"""The RRD store: real rrdtool files, layout, restart continuity, retention, rrdcached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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

from vhostmd_py.history import rrd
from vhostmd_py.history.index import Index, VmEntry, read_index, write_index
from vhostmd_py.history.rrd import XENSERVER_TARGETS, archive_layout
from vhostmd_py.sources.stats import HostStats, VmStats

# The documented sizes of a VM file (docs/EXTENSIONS.md, docs/man/vhostmdctl.1, bench/README.md).
SIZE5 = 452_856
SIZE1 = 591_096


def _series(
    path: Path, ds: str, start: float, end: float, cf: str = "LAST"
) -> Dict[int, float | None]:
    """{end of interval: value} of one data source at the finest resolution."""
    (first, _, step), names, rows = rrdtool.fetch(
        str(path), cf, "-s", str(int(start)), "-e", str(int(end)), "-r", "5"
    )
    col = list(names).index(ds)
    return {first + (i + 1) * step: row[col] for i, row in enumerate(rows)}


# XenServer's archives at update_period 5: the layout of the files of earlier releases.
XEN_LAYOUT_5 = ((1, 120), (12, 120), (720, 168), (17280, 366))


def _rras(info: Dict[str, object]) -> List[tuple]:
    """Sorted (cf, steps per row, rows) of a file's archives (all with xff 0.5)."""
    count = sum(1 for k in info if k.endswith("].cf") and k.startswith("rra["))
    assert all(info[f"rra[{i}].xff"] == 0.5 for i in range(count))
    return sorted(
        (info[f"rra[{i}].cf"], info[f"rra[{i}].pdp_per_row"], info[f"rra[{i}].rows"])
        for i in range(count)
    )


def _expected(layout: tuple) -> List[tuple]:
    return sorted((cf, n, rows) for cf in ("AVERAGE", "MIN", "MAX", "LAST") for n, rows in layout)


def test_layout_of_the_files(tmp_path: Path) -> None:
    """One file for the host and one per VM; 4 CFs at 6 resolutions: XenServer's 4 + graphs'."""
    state = tmp_path / "state"
    run_scripted(write_history_config(tmp_path / "c.xml", state), _ticks()[:2])
    vm_file = state / "vm" / f"{UUID}.rrd"
    assert (state / "host.rrd").is_file() and vm_file.is_file()
    info = rrdtool.info(str(vm_file))
    assert info["step"] == 5
    # 5 s for 10 min, 1 min for 2 h, 5 min for 25 h (day graph), 1 h for 1 week (week
    # graph), 2 h for 5 weeks (month graph), 1 day for 1 year.
    layout = ((1, 120), (12, 120), (60, 300), (720, 168), (1440, 420), (17280, 366))
    assert _rras(info) == _expected(layout)
    assert set(XEN_LAYOUT_5) <= set(layout)  # every archive XenServer's layout has
    assert info["ds[cpu].max"] == 100.0 and info["ds[cpu].minimal_heartbeat"] == 10
    assert archive_layout(60) == ((1, 120), (5, 300), (60, 168), (120, 420), (1440, 366))
    assert archive_layout(1) == (
        (1, 600), (60, 120), (300, 300), (3600, 168), (7200, 420), (86400, 366)
    )
    assert archive_layout(5, XENSERVER_TARGETS) == XEN_LAYOUT_5


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
    """The documented footprint: a VM file at update_period 5 is SIZE5 bytes, at 1 SIZE1."""
    for period, expected in ((5, SIZE5), (1, SIZE1)):
        state = tmp_path / f"state{period}"
        config = write_history_config(tmp_path / f"c{period}.xml", state, period=period)
        run_scripted(config, _steady(1))
        size = (state / "vm" / f"{UUID}.rrd").stat().st_size
        rows = sum(r for _, r in archive_layout(period)) * 4  # 4 CFs
        assert rows * 9 * 8 < size < rows * 9 * 8 + 32768  # 9 data sources of 8 bytes + headers
        assert size == expected, period


def test_file_of_the_old_layout_is_read_then_upgraded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of XenServer's layout (earlier releases): vhostmdctl reads it; the daemon adds
    the graph archives, keeping its data (prefilled into them), and goes on in it."""
    state = tmp_path / "state"
    config = write_history_config(tmp_path / "c.xml", state)
    clock = ScriptedClock()
    with monkeypatch.context() as patch:  # what an earlier release created
        patch.setattr(rrd, "ARCHIVE_TARGETS", XENSERVER_TARGETS)
        run_scripted(config, _steady(121), clock)  # +0..+600, 40 %
    vm_file = state / "vm" / f"{UUID}.rrd"
    assert _rras(rrdtool.info(str(vm_file))) == _expected(XEN_LAYOUT_5)
    end = int(WALL0) + 600
    assert [v for v in _ctl_cpu(state, end) if v is not None] == [pytest.approx(40.0)] * 120
    png = tmp_path / "old.png"
    assert _ctl(state, "graph", "--vm", "web1", "--metric", "cpu", "-o", str(png),
                "--end", str(end)) == str(png)
    assert png.read_bytes()[:4] == b"\x89PNG"

    clock.advance(20.0)  # a restart of the new release: samples at +620..+635
    run_scripted(config, _steady(4, start_cpu=100 * 10**9), clock)
    info = rrdtool.info(str(vm_file))
    assert _rras(info) == _expected(archive_layout(5))
    assert info["last_update"] == end + 35
    series = _series(vm_file, "cpu", WALL0 + 40, WALL0 + 635)  # the last 10 min, at 5 s
    assert {t - int(WALL0) for t in series} == set(range(45, 641, 5))  # one row past the end
    known = {t - int(WALL0): v for t, v in series.items() if v is not None}
    assert known == {k: pytest.approx(40.0) for k in [*range(45, 601, 5), 625, 630, 635]}
    # The old data reached the new 5-minute archive: (+100, +400] was all 40 %.
    (first, _, step), _, rows = rrdtool.fetch(
        str(vm_file), "AVERAGE", "-r", "300", "-s", str(end - 600), "-e", str(end)
    )
    assert step == 300
    by_end = {first + (i + 1) * step - int(WALL0): row[0] for i, row in enumerate(rows)}
    assert by_end[400] == pytest.approx(40.0)


def _ctl(state: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "vhostmd_py.ctl.main", "--state-dir", str(state), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _ctl_cpu(state: Path, end: int) -> List[float | None]:
    doc = json.loads(_ctl(state, "history", "--vm", "web1", "--metric", "cpu", "--since",
                          "10m", "--end", str(end), "--format", "json"))
    assert doc["step"] == 5
    return [r["cpu"] for r in doc["rows"]]


def test_man_pages_state_the_real_file_sizes(tmp_path: Path, repo_root: Path) -> None:
    """vhostmd.conf(5) and vhostmdctl(1) give the sizes files really have (measured here)."""
    from vhostmd_py.history.rrd import HOST_SOURCES, VM_SOURCES, RrdStore

    sizes = {}
    for step in (1, 5):
        store = RrdStore(tmp_path / str(step), step=step, heartbeat=max(2 * step, 10))
        store.prepare()
        store.ensure(store.vm_path(UUID), VM_SOURCES, 1.7e9)
        store.ensure(store.host_path(), HOST_SOURCES, 1.7e9)
        sizes[("vm", step)] = Path(store.vm_path(UUID)).stat().st_size
        sizes[("host", step)] = Path(store.host_path()).stat().st_size
    conf5 = (repo_root / "docs/man/vhostmd.conf.5").read_text()
    ctl1 = (repo_root / "docs/man/vhostmdctl.1").read_text().replace("\n", " ")
    for key in (("vm", 1), ("vm", 5), ("host", 1), ("host", 5)):
        assert f"{sizes[key]:,}" in conf5.replace("\n", " "), key
    for key in (("vm", 1), ("vm", 5), ("host", 1)):
        assert f"{sizes[key]:,}" in ctl1, key
    assert "six resolutions" in conf5
