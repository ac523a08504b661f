"""vhostmd_py.cycle.carry: a metric still being read at the deadline keeps its last value."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import List

import pytest

from vhostmd_py.config import parse_config
from vhostmd_py.cycle.carry import Carry, annotate
from vhostmd_py.cycle.collect import collect
from vhostmd_py.cycle.render import document
from vhostmd_py.sources.base import PENDING, RawValue, Request, ShellActionSource, SourceRegistry
from vhostmd_py.sources.shell.runner import ActionRunner
from vhostmd_py.sources.vm import VM

VM1 = VM(name="vm1", id=3, uuid="11111111-1111-1111-1111-111111111111")
VM2 = VM(name="vm2", id=4, uuid="22222222-2222-2222-2222-222222222222")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """A batch source whose answers the test sets per cycle (by metric name and VM)."""

    honours_deadline = True

    def __init__(self) -> None:
        self.answers: dict = {}

    async def collect(self, metric, vm):  # type: ignore[no-untyped-def]
        return (await self.collect_many([(metric, vm)]))[0]

    async def collect_many(self, requests, *, deadline=None) -> List[RawValue]:  # type: ignore[no-untyped-def]
        return [self.answers.get((m.name, None if vm is None else vm.uuid)) for m, vm in requests]


CONF = b"""<?xml version="1.0"?>
<!DOCTYPE metrics SYSTEM "vhostmd.dtd">
<vhostmd><globals><disk><name>d</name><path>/dev/shm/x</path><size unit="k">256</size></disk>
<update_period>1</update_period><path>/bin</path><transport>vbd</transport></globals>
<metrics>
<metric type="uint64" context="host"><name>H</name><action>true</action></metric>
<metric type="uint64" context="vm"><name>V</name><action>true</action></metric>
</metrics></vhostmd>
"""


def _cycle(source: Scripted, carry: Carry | None, vms=(VM1, VM2)) -> bytes:  # type: ignore[no-untyped-def]
    config = parse_config(CONF)
    snap = asyncio.run(
        collect(config, list(vms), None, sources=SourceRegistry(source), carry=carry)  # type: ignore[arg-type]
    )
    return document(snap)


def test_pending_value_is_carried_and_replaced_when_fresh() -> None:
    clock = Clock()
    carry = Carry(bound=30, wall=clock)
    src = Scripted()
    src.answers = {("H", None): b"7", ("V", VM1.uuid): b"1", ("V", VM2.uuid): b"2"}
    first = _cycle(src, carry)
    assert first.count(b"<metric ") == 3
    clock.now += 1
    src.answers = {("H", None): PENDING, ("V", VM1.uuid): PENDING, ("V", VM2.uuid): b"5"}
    second = _cycle(src, carry)
    # Every metric is there: the pending ones with their last value, unmarked
    # (no <freshness/>: the bytes are what upstream's reader knows).
    assert second.count(b"<metric ") == 3
    assert b"<value>7</value>" in second and b"<value>1</value>" in second
    assert b"<value>5</value>" in second and b"age=" not in second
    assert carry.carried_last == 2
    clock.now += 1
    src.answers = {("H", None): b"8", ("V", VM1.uuid): b"9", ("V", VM2.uuid): b"5"}
    third = _cycle(src, carry)
    assert b"<value>8</value>" in third and b"<value>9</value>" in third
    assert carry.carried_last == 0


def test_without_carry_pending_is_left_out() -> None:
    src = Scripted()
    src.answers = {("H", None): PENDING, ("V", VM1.uuid): b"1", ("V", VM2.uuid): PENDING}
    doc = _cycle(src, None)
    assert doc.count(b"<metric ") == 1


def test_failure_forgets_the_carried_value() -> None:
    """Only lateness is bridged: a failed read is left out, and is not carried later."""
    clock = Clock()
    carry = Carry(bound=30, wall=clock)
    src = Scripted()
    src.answers = {("H", None): b"7"}
    _cycle(src, carry, vms=())
    src.answers = {("H", None): None}  # failed (the source logged why)
    assert b"<name>H</name>" not in _cycle(src, carry, vms=())
    src.answers = {("H", None): PENDING}
    assert b"<name>H</name>" not in _cycle(src, carry, vms=())


def test_bound_drops_a_stale_value_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    carry = Carry(bound=3, wall=clock)
    src = Scripted()
    src.answers = {("H", None): b"7"}
    _cycle(src, carry, vms=())
    src.answers = {("H", None): PENDING}
    seen = []
    with caplog.at_level(logging.WARNING, logger="vhostmd_py.cycle.carry"):
        for _ in range(6):
            clock.now += 1
            seen.append(b"<name>H</name>" in _cycle(src, carry, vms=()))
    # Read at t, carried at t+1, t+2, t+3 (age 3 <= bound), dropped from t+4 on.
    assert seen == [True, True, True, False, False, False]
    dropped = [r for r in caplog.records if "no longer published" in r.getMessage()]
    assert len(dropped) == 1 and "metric H" in dropped[0].getMessage()
    with caplog.at_level(logging.INFO, logger="vhostmd_py.cycle.carry"):
        src.answers = {("H", None): b"8"}
        assert b"<value>8</value>" in _cycle(src, carry, vms=())
    assert any("a fresh value again" in r.getMessage() for r in caplog.records)


def test_a_gone_vm_is_forgotten() -> None:
    """A VM's carried value never outlives its absence (nor reaches another VM)."""
    clock = Clock()
    carry = Carry(bound=30, wall=clock)
    src = Scripted()
    src.answers = {("V", VM1.uuid): b"1", ("V", VM2.uuid): b"2"}
    _cycle(src, carry)
    _cycle(src, carry, vms=(VM2,))  # VM1 gone this cycle
    src.answers = {("V", VM1.uuid): PENDING, ("V", VM2.uuid): PENDING}
    doc = _cycle(src, carry)
    assert b"<value>1</value>" not in doc  # forgotten while it was gone
    assert doc.count(b"<value>2</value>") == 1
    assert doc.index(VM2.uuid.encode()) < doc.index(b"<value>2</value>")


def test_annotation_with_freshness_says_the_age() -> None:
    clock = Clock()
    carry = Carry(bound=30, annotate=True, wall=clock)
    src = Scripted()
    src.answers = {("H", None): b"7", ("V", VM1.uuid): b"1", ("V", VM2.uuid): b"2"}
    assert b"age=" not in _cycle(src, carry)  # fresh values carry no age
    clock.now += 2.4
    src.answers = {("H", None): PENDING, ("V", VM1.uuid): b"1", ("V", VM2.uuid): b"2"}
    doc = _cycle(src, carry)
    assert b"<metric age='2' type='uint64' context='host'>" in doc
    assert doc.count(b"age=") == 1


def test_annotate_every_element_of_a_per_device_value() -> None:
    xml = (b"  <metric type='uint64' context='vm' id='1' uuid='u'>\n    <name>a.vda</name>\n"
           b"    <value>1</value>\n  </metric>\n"
           b"  <metric type='uint64' context='vm' id='1' uuid='u'>\n    <name>a.vdb</name>\n"
           b"    <value>2</value>\n  </metric>\n")
    out = annotate(xml, 5.6)
    assert out.count(b"<metric age='6' type=") == 2
    assert out.replace(b" age='6'", b"") == xml


def test_bound_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Carry(bound=0)


def test_shell_action_late_then_arrives_between_cycles(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Real /bin/sh: a slow action is PENDING at the deadline, its value used once it ended."""
    config = parse_config(CONF.replace(b"<action>true</action></metric>\n<metric type=\"uint64\" "
                                       b"context=\"vm\"><name>V</name><action>true</action>",
                                       b"<action>sleep 0.6; echo 42</action></metric>\n"
                                       b"<metric type=\"uint64\" context=\"vm\"><name>V</name>"
                                       b"<action>echo 1</action>"))
    runner = ActionRunner(timeout=10)
    source = ShellActionSource(runner, path="/bin:/usr/bin")
    host = next(m for m in config.metrics if m.name == "H")
    requests: List[Request] = [(host, None)]

    async def go() -> list:
        first = await source.collect_many(requests, deadline=time.monotonic() + 0.1)
        await asyncio.sleep(0.8)  # it ends between the two cycles
        second = await source.collect_many(requests, deadline=time.monotonic() + 0.1)
        return [first, second]

    try:
        first, second = asyncio.run(go())
    finally:
        runner.close()
    assert first == [PENDING]
    assert second == [b"42\n"]  # the late value, not a fresh start still running
