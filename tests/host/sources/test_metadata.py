"""Per-domain policy from libvirt metadata: hostile input, rare reads, libvirt's test driver."""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List

import pytest

from vhostmd_py.config.records import Rule
from vhostmd_py.libvirt_host import start_events
from vhostmd_py.sources.metadata import (
    KEY,
    MAX_METADATA,
    NAMESPACE,
    MetadataBook,
    MetadataError,
    parse_metadata,
    read_domain,
)
from vhostmd_py.sources.vm import VM

libvirt = pytest.importorskip("libvirt")

PERFMON = (b'<config><variable><name value="cpu_usage"/><alarm_trigger_level value="0.5"/>'
           b"</variable></config>")


def test_parse_rule_and_perfmon_config() -> None:
    got = parse_metadata(b'<policy blocked="no" shared="no"><deny>HostName</deny>' + PERFMON
                         + b"</policy>")
    assert got.rule == Rule(deny=("HostName",), blocked=False, shared=False)
    assert got.perfmon is not None and got.perfmon.startswith(b"<config><variable>")
    assert b'value="0.5"' in got.perfmon


def test_perfmon_only_says_no_rule() -> None:
    got = parse_metadata(b"<policy>" + PERFMON + b"</policy>")
    assert got.rule is None and got.perfmon is not None


def test_namespaced_children_as_libvirt_stores_them() -> None:
    got = parse_metadata(f'<v:policy xmlns:v="{NAMESPACE}"><v:allow>VCpus</v:allow>'
                         f'<v:config><v:variable><v:name value="x"/></v:variable></v:config>'
                         f"</v:policy>")
    assert got.rule == Rule(allow=("VCpus",))
    assert got.perfmon == b'<config><variable><name value="x"/></variable></config>'


@pytest.mark.parametrize("data, wording", [
    (b"<policy>" * 40 + b"</policy>" * 40, "levels deep"),
    (b"<policy><deny>" + b"x" * (MAX_METADATA + 10) + b"</deny></policy>", "bytes, more than"),
    (b'<!DOCTYPE p [<!ENTITY a "aaaaaaaaaa">]><policy><deny>&a;</deny></policy>', "DOCTYPE"),
    (b"<alarms/>", "expected <policy>"),
    (b"\x00\xff\xfe binary \x01", "not XML"),
    (b'<policy blocked="perhaps"/>', "expected yes or no"),
    (b"<policy><allow></allow></policy>", "is empty"),
])
def test_hostile_metadata_is_refused_with_a_reason(data: bytes, wording: str) -> None:
    with pytest.raises(MetadataError) as err:
        parse_metadata(data)
    assert wording in str(err.value)


VM_A = VM(id=1, name="a", uuid="aaaaaaaa-0000-0000-0000-000000000001")
VM_B = VM(id=2, name="b", uuid="aaaaaaaa-0000-0000-0000-000000000002")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_book_reads_at_first_sight_then_at_the_refresh_period_or_when_told() -> None:
    store: Dict[str, bytes | None] = {VM_A.uuid: b"<policy><deny>X</deny></policy>",
                                         VM_B.uuid: None}
    clock = Clock()
    book = MetadataBook(refresh=300, reader=lambda vm: store[vm.uuid], clock=clock)
    assert book.update([VM_A, VM_B]) is True
    assert book.reads == 2
    p = book.policy(VM_A.uuid)
    assert p is not None and p.rule == Rule(deny=("X",))
    assert book.policy(VM_B.uuid) is None
    for _ in range(50):  # fifty cycles in the refresh period: no read at all
        clock.now += 1
        assert book.update([VM_A, VM_B]) is False
    assert book.reads == 2
    store[VM_B.uuid] = b'<policy blocked="yes"/>'
    book.changed(VM_B.uuid)  # libvirt's metadata-change event
    assert book.update([VM_A, VM_B]) is True and book.reads == 3
    p = book.policy(VM_B.uuid)
    assert p is not None and p.rule == Rule(blocked=True)
    clock.now += 300
    assert book.update([VM_A, VM_B]) is False and book.reads == 5


def test_bad_metadata_logged_once_per_content_and_only_that_vm_ignored(
        caplog: pytest.LogCaptureFixture) -> None:
    store = {VM_A.uuid: b"<policy><deny>", VM_B.uuid: b"<policy><deny>Y</deny></policy>"}
    clock = Clock()
    book = MetadataBook(refresh=1, reader=lambda vm: store[vm.uuid], clock=clock)
    with caplog.at_level(logging.ERROR, logger="vhostmd_py.sources.metadata"):
        for _ in range(5):
            book.update([VM_A, VM_B])
            clock.now += 1
    bad = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(bad) == 1 and "'a'" in bad[0] and VM_A.uuid in bad[0]
    assert book.policy(VM_A.uuid) is None
    p = book.policy(VM_B.uuid)
    assert p is not None and p.rule == Rule(deny=("Y",))


def test_reader_failure_keeps_the_last_policy() -> None:
    calls: List[int] = []

    def reader(vm: VM) -> bytes:
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("domain not found")
        return b'<policy blocked="yes"/>'

    clock = Clock()
    book = MetadataBook(refresh=1, reader=reader, clock=clock)
    book.update([VM_A])
    clock.now += 2
    book.update([VM_A])
    p = book.policy(VM_A.uuid)
    assert p is not None and p.rule == Rule(blocked=True)


def test_read_from_libvirts_test_driver_and_the_change_event() -> None:
    """Real libvirt (test driver): read_domain, virDomainSetMetadata and its event."""
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    assert start_events(libvirt)  # libvirt's event loop, once per process
    conn = libvirt.open("test:///default")
    try:
        dom = conn.lookupByName("test")
        # test:///default is one instance per process: start from no metadata of ours.
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, NAMESPACE,
                        libvirt.VIR_DOMAIN_AFFECT_LIVE)
        vm = VM(id=dom.ID(), name="test", uuid=dom.UUIDString())
        assert read_domain(conn, vm, libvirt) is None
        book = MetadataBook(refresh=3600, reader=lambda v: read_domain(conn, v, libvirt))
        book.update([vm])
        assert book.policy(vm.uuid) is None
        seen: List[Any] = []

        def on_change(_c: Any, d: Any, _type: int, uri: str, _o: Any) -> None:
            if uri == NAMESPACE:
                seen.append(d.UUIDString())
                book.changed(d.UUIDString())

        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
                                    on_change, None)
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                        '<policy><deny>VCpus</deny></policy>', KEY, NAMESPACE,
                        libvirt.VIR_DOMAIN_AFFECT_LIVE)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)
        assert seen == [vm.uuid]
        assert book.update([vm]) is True
        p = book.policy(vm.uuid)
        assert p is not None and p.rule == Rule(deny=("VCpus",))
    finally:
        conn.close()
