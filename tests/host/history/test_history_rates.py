"""Derived values (CPU %, rates) through the daemon's cycle, fed by a scripted source."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from helpers.daemon import metrics_of
from helpers.history import (
    EXPECT_HOST,
    EXPECT_IOWAIT,
    EXPECT_RD,
    EXPECT_RX,
    EXPECT_RX_PK,
    EXPECT_TX,
    EXPECT_VM_CPU,
    EXPECT_WR,
    EXPECT_WR_REQ,
    UUID,
    VM_SCRIPT,
    run_scripted,
    scripted_ticks,
    write_history_config,
)

from vhostmd_py.cycle.render import document
from vhostmd_py.history.rates import Counter, CounterBook, advance, derive
from vhostmd_py.sources.stats import CycleStats, HostStats, VmStats


def _approx(values: List[float | None]) -> List[object]:
    return [None if v is None else pytest.approx(v) for v in values]


def test_rates_and_cpu_through_the_daemon_cycle(tmp_path: Path) -> None:
    """First sample, wrap, reset, gap, absent counter and VM restart give hand-computed values."""
    config = write_history_config(tmp_path / "c.xml", tmp_path / "state")
    source = run_scripted(config, scripted_ticks())
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
    source = run_scripted(config, scripted_ticks())
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
    source = run_scripted(config, scripted_ticks()[:3])
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
    snap1 = CycleStats(0.0, 0.0, HostStats(), (vm,))
    snap2 = CycleStats(
        5.0, 5.0, HostStats(), (VmStats(uuid=UUID, name="a", id=1, vcpus=1, cpu_time=10**9),)
    )
    values1, book1 = derive(CounterBook.empty(), snap1, heartbeat=10)
    again1, again_book = derive(CounterBook.empty(), snap1, heartbeat=10)
    assert values1 == again1 and book1 == again_book
    values2, _ = derive(book1, snap2, heartbeat=10)
    assert values2.vms[0].cpu_pct == pytest.approx(20.0)
    _, empty = derive(book1, CycleStats(5.0, 5.0, HostStats(), ()), heartbeat=10)
    assert len(empty) == 0
