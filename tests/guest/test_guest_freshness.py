"""Freshness and host identity: real disks written by DiskWriter, then left alone."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List

import pytest
from helpers.wiredisk import DiskWriter
from vhostmd_guest import libmetrics as lm
from vhostmd_guest.errors import MetricNotFoundError, MetricsError, MetricValueError
from vhostmd_guest.freshness import FreshnessUnavailableError
from vhostmd_guest.reader import DiskSource, MetricsReader
from vhostmd_wire import protocol

IDENT_A = "0123456789abcdef0123456789abcdef"
IDENT_B = "fedcba9876543210fedcba9876543210"


def document(
    published: float | None,
    period: int | None = 1,
    identity: str | None = IDENT_A,
    extra: str = "",
) -> bytes:
    """A document as a host with freshness on (or off: None) renders it."""
    parts = [
        '<metric type="uint32" context="host"><name>TotalPhyCPUs</name><value>8</value></metric>\n'
    ]
    if published is not None:
        parts.append(
            f'<metric type="real64" context="host" unit="s"><name>{protocol.FRESHNESS_TIME}</name>'
            f"<value>{protocol.format_publication_time(published)}</value></metric>\n"
        )
    if period is not None:
        parts.append(
            f'<metric type="uint32" context="host" unit="s">'
            f"<name>{protocol.FRESHNESS_PERIOD}</name>"
            f"<value>{period}</value></metric>\n"
        )
    if identity is not None:
        parts.append(
            f'<metric type="string" context="host"><name>{protocol.HOST_IDENTITY}</name>'
            f"<value>{identity}</value></metric>\n"
        )
    parts.append(extra)
    return protocol.document(*(p.encode() for p in parts))


class FakeClocks:
    """A wall clock and a monotonic clock the test moves; the monotonic one starts elsewhere."""

    def __init__(self, wall: float) -> None:
        self.wall = wall
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def reader_for(path: Path, clocks: FakeClocks) -> MetricsReader:
    return MetricsReader(
        DiskSource(path=str(path), busy_timeout=1.0),
        clock=lambda: clocks.mono,
        sleep=lambda s: clocks.advance(s),
        wall_clock=lambda: clocks.wall,
    )


def test_contract_constants() -> None:
    """The names and types the host publishes (one place: vhostmd_wire.protocol)."""
    assert (protocol.FRESHNESS_TIME, protocol.FRESHNESS_PERIOD, protocol.HOST_IDENTITY) == (
        "PublicationTime",
        "UpdatePeriod",
        "HostIdentity",
    )
    assert protocol.format_publication_time(1700000000.12345) == "1700000000.123"
    assert protocol.is_host_identity(IDENT_A)
    assert not protocol.is_host_identity(IDENT_A.upper())
    assert not protocol.is_host_identity(IDENT_A[:-1])


def test_stale_within_two_periods_injected_clock(tmp_path: Path) -> None:
    """Host publishes every period while the clock moves; then stops: stale after 2 periods."""
    clocks = FakeClocks(wall=1_700_000_000.0)
    path = tmp_path / "vhostmd0"
    with DiskWriter.create(path) as disk:
        reader = reader_for(path, clocks)
        for _ in range(5):  # the host updating every 5 s, the guest reading in between
            disk.publish(document(clocks.wall, period=5))
            clocks.advance(2.5)
            assert reader.is_stale() is False
            assert reader.age() == pytest.approx(2.5, abs=0.001)
            clocks.advance(2.5)
        # The host stops (the disk keeps its last document).
        last = clocks.wall - 5.0
        assert reader.is_stale() is False  # age 5 s
        clocks.advance(4.9)
        assert reader.is_stale() is False  # age 9.9 s <= 2 x 5
        clocks.advance(0.2)
        assert reader.is_stale() is True  # age 10.1 s
        assert reader.age() == pytest.approx(clocks.wall - last, abs=0.001)
        assert reader.is_stale(factor=3.0) is False
        assert lm.metrics_are_stale(reader=reader) is True
        assert lm.get_metrics_age(reader=reader) == pytest.approx(10.1, abs=0.001)


def test_stale_by_monotonic_clock_despite_skew(tmp_path: Path) -> None:
    """Guest clock an hour behind the host: the age rule cannot fire, the unchanged rule does."""
    clocks = FakeClocks(wall=1_700_000_000.0)
    path = tmp_path / "vhostmd0"
    with DiskWriter.create(path) as disk:
        disk.publish(document(clocks.wall + 3600, period=1))
        reader = reader_for(path, clocks)
        assert reader.is_stale() is False
        assert reader.age() < -3590  # the host is "ahead": the age says nothing
        clocks.advance(1.9)
        assert reader.is_stale() is False
        clocks.advance(0.2)
        assert reader.unchanged_for() == pytest.approx(2.1)
        assert reader.is_stale() is True  # same bytes for 2.1 s > 2 x 1 s
        # The host publishes again: fresh again (new bytes reset the rule).
        disk.publish(document(clocks.wall + 3600, period=1))
        assert reader.is_stale() is False


@pytest.mark.slow
def test_stale_with_real_clocks_and_sleep(tmp_path: Path) -> None:
    """Period 1 s, real time: stale between 2 s and 2.3 s after the last publication."""
    path = tmp_path / "vhostmd0"
    with DiskWriter.create(path) as disk:
        reader = MetricsReader(DiskSource(path=str(path)))
        for _ in range(3):
            # Measured from the publication time the document states: the
            # age rule counts from there (the write itself comes after it).
            last = time.time()
            disk.publish(document(last, period=1))
            assert reader.is_stale() is False
            time.sleep(0.3)
        seen: List[float] = []
        while time.time() - last < 3.0:
            if reader.is_stale():
                seen.append(time.time() - last)
                break
            time.sleep(0.02)
    assert seen, "never reported stale within 3 s of the last publication"
    assert 2.0 <= seen[0] <= 2.3


def test_identity_change_is_seen(tmp_path: Path) -> None:
    """The VM 'migrates': the disk now carries another host's identity."""
    path = tmp_path / "vhostmd0"
    clocks = FakeClocks(wall=1_700_000_000.0)
    with DiskWriter.create(path) as disk:
        disk.publish(document(clocks.wall, identity=IDENT_A))
        reader = reader_for(path, clocks)
        assert reader.host_identity() == IDENT_A
        assert reader.identity_changed() is False  # first call: the baseline
        disk.publish(document(clocks.wall + 1, identity=IDENT_A))
        assert reader.identity_changed() is False
        disk.publish(document(clocks.wall + 2, identity=IDENT_B))
        assert reader.identity_changed() is True
        assert lm.get_host_identity(reader=reader) == IDENT_B
        assert reader.identity_changed() is False  # the new host is the baseline now
        disk.publish(document(None, period=None, identity=None))  # an upstream host
        assert reader.identity_changed() is True
        assert reader.host_identity() is None


def test_upstream_document_has_no_freshness(tmp_path: Path) -> None:
    """Without the metrics: age/is_stale raise a MetricsError subclass; identity is None."""
    path = tmp_path / "vhostmd0"
    with DiskWriter.create(path) as disk:
        disk.publish(document(None, period=None, identity=None))
        reader = MetricsReader(DiskSource(path=str(path)))
        for call in (reader.age, reader.is_stale):
            with pytest.raises(FreshnessUnavailableError) as info:
                call()
            assert isinstance(info.value, MetricNotFoundError)
            assert isinstance(info.value, MetricsError)
            assert "does not publish freshness" in str(info.value)
        assert reader.host_identity() is None
        with pytest.raises(ValueError):
            reader.is_stale(factor=0)


def test_malformed_identity_and_period_are_value_errors(tmp_path: Path) -> None:
    path = tmp_path / "vhostmd0"
    with DiskWriter.create(path) as disk:
        disk.publish(document(1.0, period=0, identity="NOT-HEX"))
        reader = MetricsReader(DiskSource(path=str(path)))
        with pytest.raises(MetricValueError):
            reader.host_identity()
        with pytest.raises(MetricValueError):
            reader.is_stale()
