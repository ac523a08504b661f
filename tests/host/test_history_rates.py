"""Derived values (CPU %, rates) through the daemon's cycle, fed by a scripted source."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from helpers.history import Tick, run_scripted, write_history_config
from test_e2e_daemon import metrics_of

from vhostmd_py.history.rates import Counter, CounterBook, advance, derive
from vhostmd_py.render import document
from vhostmd_py.stats import BlockStats, HostStats, NetStats, StatsSnapshot, VmStats

UUID = "11111111-2222-3333-4444-555555555555"
WRAP = 2**32

# Per cycle: dt, vm id, cpu_time (ns), vnet0 (rx, tx, rx_pk, tx_pk), vda (rd, wr, rd_req, wr_req)
VM_SCRIPT: List[
    Tuple[float, int, int, Tuple[int, int, int, int], Tuple[int, int, int, int | None]]
] = [
    (0, 1, 10 * 10**9, (1000, WRAP - 1000, 10, 10), (0, 0, 0, 0)),  # first sample
    (5, 1, 15 * 10**9, (6000, WRAP - 500, 60, 20), (51200, 0, 5, None)),  # wr_req absent
    (5, 1, 40 * 10**9, (6000, 500, 60, 20), (51200, 5000, 5, 10)),  # tx wraps; CPU > 100 %
    (5, 1, 1 * 10**9, (1000, 1500, 60, 20), (51200, 5000, 5, 20)),  # cpu and rx go down
    (30, 1, 2 * 10**9, (2000, 2500, 70, 30), (51200, 5000, 5, 30)),  # gap > heartbeat (10 s)
    (5, 1, 4 * 10**9, (7000, 2500, 70, 30), (51200, 5000, 5, 30)),
    (5, 2, 9 * 10**9, (9000, 3000, 80, 40), (61200, 6000, 6, 31)),  # restarted: new id
    (5, 2, 14 * 10**9, (10000, 3000, 80, 40), (61200, 6000, 6, 31)),
]

# Per cycle: user, system, idle, iowait ticks (USER_HZ 100, 2 CPUs: 1000 ticks per 5 s)
HOST_SCRIPT = [
    (1000, 500, 8000, 100),
    (1300, 600, 8500, 200),  # busy 400 of 1000 -> 40 %, iowait 10 %
    (1800, 600, 9000, 200),  # 50 %
    (2050, 600, 9750, 200),  # 25 %
    (2500, 600, 14800, 200),  # after the gap: unknown
    (3500, 600, 14800, 200),  # 100 %
    (3500, 600, 15800, 200),  # 0 %
    (4000, 600, 16300, 200),  # 50 %
]

# Hand-computed expectations, per cycle.
EXPECT_VM_CPU = [None, 50.0, 100.0, None, None, 20.0, None, 50.0]
EXPECT_RX = [None, 1000.0, 0.0, None, None, 1000.0, None, 200.0]
EXPECT_TX = [None, 100.0, None, 200.0, None, 0.0, None, 0.0]
EXPECT_RX_PK = [None, 10.0, 0.0, 0.0, None, 0.0, None, 0.0]
EXPECT_RD = [None, 10240.0, 0.0, 0.0, None, 0.0, None, 0.0]
EXPECT_WR = [None, 0.0, 1000.0, 0.0, None, 0.0, None, 0.0]
EXPECT_WR_REQ = [None, None, None, 2.0, None, 0.0, None, 0.0]
EXPECT_HOST = [None, 40.0, 50.0, 25.0, None, 100.0, 0.0, 50.0]
EXPECT_IOWAIT = [None, 10.0, 0.0, 0.0, None, 0.0, 0.0, 0.0]


def _ticks() -> List[Tick]:
    ticks = []
    for (dt, vid, cpu, net, blk), (user, system, idle, iowait) in zip(VM_SCRIPT, HOST_SCRIPT):
        vm = VmStats(
            uuid=UUID,
            name="web1",
            id=vid,
            vcpus=2,
            cpu_time=cpu,
            nics=(
                NetStats(
                    "vnet0", rx_bytes=net[0], tx_bytes=net[1], rx_packets=net[2], tx_packets=net[3]
                ),
            ),
            disks=(
                BlockStats("vda", rd_bytes=blk[0], wr_bytes=blk[1], rd_req=blk[2], wr_req=blk[3]),
            ),
        )
        host = HostStats(
            cpus=2,
            cpu_ticks={
                "user": user,
                "nice": 0,
                "system": system,
                "idle": idle,
                "iowait": iowait,
                "irq": 0,
                "softirq": 0,
                "steal": 0,
            },
            clock_ticks=100,
            meminfo={"MemTotal": 1000, "MemAvailable": 250},
            loadavg=(0.5, 0.25, 0.125),
        )
        ticks.append(Tick(dt, host, (vm,)))
    return ticks


def _approx(values: List[float | None]) -> List[object]:
    return [None if v is None else pytest.approx(v) for v in values]


def test_rates_and_cpu_through_the_daemon_cycle(tmp_path: Path) -> None:
    """First sample, wrap, reset, gap, absent counter and VM restart give hand-computed values."""
    config = write_history_config(tmp_path / "c.xml", tmp_path / "state")
    source = run_scripted(config, _ticks())
    assert len(source.derived) == len(VM_SCRIPT)
    vms = [d.vms[0] if d is not None else None for d in source.derived]
    assert all(vm is not None for vm in vms)
    cpu = [vm.cpu_pct for vm in vms if vm is not None]
    nics = [vm.nics[0] for vm in vms if vm is not None]
    disks = [vm.disks[0] for vm in vms if vm is not None]
    assert cpu == _approx(EXPECT_VM_CPU)
    assert [n.rx_bytes for n in nics] == _approx(EXPECT_RX)
    assert [n.tx_bytes for n in nics] == _approx(EXPECT_TX)
    assert [n.rx_packets for n in nics] == _approx(EXPECT_RX_PK)
    assert [d.rd_bytes for d in disks] == _approx(EXPECT_RD)
    assert [d.wr_bytes for d in disks] == _approx(EXPECT_WR)
    assert [d.wr_req for d in disks] == _approx(EXPECT_WR_REQ)
    # Totals of a single device equal it; unknown device -> unknown total.
    assert [vm.net_tx_bytes for vm in vms if vm is not None] == _approx(EXPECT_TX)
    assert [vm.disk_wr_req for vm in vms if vm is not None] == _approx(EXPECT_WR_REQ)
    hosts = [d.host for d in source.derived if d is not None]
    assert [h.cpu_pct for h in hosts] == _approx(EXPECT_HOST)
    assert [h.iowait_pct for h in hosts] == _approx(EXPECT_IOWAIT)
    assert {h.mem_used_pct for h in hosts} == {75.0}
    assert {h.load1 for h in hosts} == {0.5}


def _published(source_doc: bytes) -> Dict[Tuple[str, str], str]:
    return {k: v for k, v in metrics_of(source_doc).items() if k[0] != "One"}


def test_published_metrics_follow_the_derived_values(tmp_path: Path) -> None:
    """publish=yes: the guest document carries CPU % and 1-minute averages (xff 0.5)."""
    config = write_history_config(tmp_path / "c.xml", tmp_path / "state")
    source = run_scripted(config, _ticks())
    docs = [document(s) for s in source.published if s is not None]
    assert len(docs) == len(VM_SCRIPT)
    assert _published(docs[0]) == {}  # the first sample: nothing known, nothing invented
    assert _published(docs[1]) == {
        ("HostCPUUtilization", "host"): "40.00",
        ("VMCPUUtilization", "1"): "50.00",
        ("VMNetRxRate", "1"): "1000.00",
        ("VMNetTxRate", "1"): "100.00",
        ("VMDiskReadRate", "1"): "10240.00",
        ("VMDiskWriteRate", "1"): "0.00",
    }
    last = _published(docs[-1])
    # Host: 30 s of known values in the last 60 s (the gap excluded): their mean.
    assert last[("HostCPUUtilization1m", "host")] == f"{(40 + 50 + 25 + 100 + 0 + 50) / 6:.2f}"
    # 5 minutes: 30 s known is less than half the window: unknown, left out.
    assert ("HostCPUUtilization5m", "host") not in last
    # The VM: only 20 s known in the last minute (reset, gap, restart): left out.
    assert ("VMCPUUtilization1m", "2") not in last
    assert last[("VMCPUUtilization", "2")] == "50.00"
    # Units are in the document (ordinary <metric> elements, upstream's layout).
    assert b"<metric type='real64' context='host' unit='%'>" in docs[1]
    assert b"context='vm' id='1' uuid='" + UUID.encode() + b"' unit='bytes/s'>" in docs[1]


def test_publish_off_leaves_the_document_alone(tmp_path: Path) -> None:
    """publish=no records history but publishes nothing new."""
    config = write_history_config(tmp_path / "c.xml", tmp_path / "state", publish="no")
    source = run_scripted(config, _ticks()[:3])
    assert source.derived[-1] is not None and source.derived[-1].host.cpu_pct == 50.0
    docs = [document(s) for s in source.published if s is not None]
    assert all(_published(d) == {} for d in docs)


@pytest.mark.parametrize(
    ("prev", "value", "mono", "reason", "rate"),
    [
        (None, 5, 1.0, "first", None),
        (Counter(10, 0.0), None, 1.0, "absent", None),
        (Counter(10, 0.0), 5, 1.0, "reset", None),
        (Counter(10, 0.0), 30, 11.0, "gap", None),
        (Counter(10, 5.0), 30, 5.0, "clock", None),
        (Counter(10, 0.0), 10**12 + 10, 1.0, "absurd", None),
        (Counter(10, 0.0), 30, 10.0, None, 2.0),
    ],
)
def test_advance_semantics(
    prev: Counter | None,
    value: int | None,
    mono: float,
    reason: str | None,
    rate: float | None,
) -> None:
    """The one counter function: every case named, a rate only for a good delta."""
    step = advance(prev, value, mono, heartbeat=10.0, max_rate=1e11)
    assert step.reason == reason
    assert step.rate == rate
    assert (step.state is None) == (value is None)


def test_derive_is_pure_and_forgets_vanished_vms() -> None:
    """Same inputs, same outputs; a VM that is gone leaves no baseline behind."""
    vm = VmStats(uuid=UUID, name="a", id=1, vcpus=1, cpu_time=0)
    snap1 = StatsSnapshot(0.0, 0.0, HostStats(), (vm,))
    snap2 = StatsSnapshot(
        5.0, 5.0, HostStats(), (VmStats(uuid=UUID, name="a", id=1, vcpus=1, cpu_time=10**9),)
    )
    values1, book1 = derive(CounterBook.empty(), snap1, heartbeat=10)
    again1, again_book = derive(CounterBook.empty(), snap1, heartbeat=10)
    assert values1 == again1 and book1 == again_book
    values2, _ = derive(book1, snap2, heartbeat=10)
    assert values2.vms[0].cpu_pct == pytest.approx(20.0)
    _, empty = derive(book1, StatsSnapshot(5.0, 5.0, HostStats(), ()), heartbeat=10)
    assert len(empty) == 0
