"""Tests of the OpenMetrics endpoint's parts: names, config, health, the collector.

The exposition is produced by prometheus_client from our collector and read
back with its strict OpenMetrics parser (no fakes: real records, real bytes).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Dict, List

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from vhostmd_wire.openmetrics import is_valid_name, metric_name, value_scale

from vhostmd_py.config import EndpointConfig, parse_config
from vhostmd_py.cycle.render import render_metric
from vhostmd_py.cycle.snapshot import Snapshot, VmBlock
from vhostmd_py.errors import ConfigError
from vhostmd_py.publish.endpoint import VhostmdCollector, snapshot_families
from vhostmd_py.publish.health import Health
from vhostmd_py.sources.shell.runner import ActionResult
from vhostmd_py.sources.vm import VM

ODD = 'a"b\nc{x="y"}'

# --- names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "name", "unit", "expected"),
    [
        ("host", "TotalCPUTime", "s", "vhostmd_host_total_cpu_time_seconds"),
        ("host", "NumberOfPhysicalCPUs", None, "vhostmd_host_number_of_physical_cpus"),
        ("vm", "UsedMemory", "MiB", "vhostmd_vm_used_memory_bytes"),
        ("vm", "vm.nic.rx_bytes", "B", "vhostmd_vm_nic_rx_bytes"),
        ("vm", "vm.cpu.time", "ns", "vhostmd_vm_cpu_time_seconds"),
        ("vm", "Load", "%", "vhostmd_vm_load_ratio"),
        ("vm", "Rate", "KiB/s", "vhostmd_vm_rate_bytes_per_second"),
        ("vm", "Pages", "pages", "vhostmd_vm_pages"),
        ("vm", "Swapped", "pages", "vhostmd_vm_swapped_pages"),
        ("vm", "Requests_total", "", "vhostmd_vm_requests_total_value"),
        ("host", "x_info", None, "vhostmd_host_x_info_value"),
        ("vm", ODD, None, "vhostmd_vm_a_b_c_x_y"),
        ("host", "", None, "vhostmd_host_unnamed"),
        ("host", "Grüße", "weird{unit}", "vhostmd_host_gr_e_weird_unit"),
    ],
)
def test_metric_name(context: str, name: str, unit: str | None, expected: str) -> None:
    """snake_case, base-unit suffix once, reserved suffixes avoided."""
    assert metric_name(context, name, unit) == expected


def test_value_scale() -> None:
    """The factor to the base unit the suffix names."""
    assert value_scale("MiB") == 1024 * 1024
    assert value_scale("KiB") == 1024
    assert value_scale("ns") == 1e-9
    assert value_scale("%") == 0.01
    assert value_scale("pages") == 1.0
    assert value_scale(None) == 1.0


@given(st.sampled_from(["host", "vm"]), st.text(), st.one_of(st.none(), st.text()))
def test_metric_name_always_valid(context: str, name: str, unit: str | None) -> None:
    """Whatever the config's name and unit hold, the result is a valid metric name."""
    assert is_valid_name(metric_name(context, name, unit))


# --- config --------------------------------------------------------------------------

CONFIG = """<?xml version="1.0" ?>
<vhostmd>
  <globals>
    <disk><name>d</name><path>/dev/shm/vhostmd0</path><size unit="k">64</size></disk>
    <update_period>5</update_period>
    <path>/bin</path>
    <transport>vbd</transport>
    {endpoint}
  </globals>
  <metrics/>
</vhostmd>
"""


def _load(endpoint: str) -> EndpointConfig | None:
    return parse_config(CONFIG.format(endpoint=endpoint).encode(), file="t.conf").metrics_endpoint


def test_endpoint_config_absent_and_defaults() -> None:
    """No element: no endpoint; an empty one: loopback, port 9178."""
    assert _load("") is None
    assert _load("<metrics_endpoint/>") == EndpointConfig("127.0.0.1", 9178, False)
    assert _load('<metrics_endpoint address="::1" port="0"/>') == EndpointConfig("::1", 0, False)
    assert _load('<metrics_endpoint address="127.0.0.2" port=" 9100 "/>') == EndpointConfig(
        "127.0.0.2", 9100, False
    )
    assert _load('<metrics_endpoint address="192.0.2.7" allow_remote="yes"/>') == EndpointConfig(
        "192.0.2.7", 9178, True
    )


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ('<metrics_endpoint address="0.0.0.0"/>', "0.0.0.0 is not a loopback address"),
        ('<metrics_endpoint address="::"/>', ":: is not a loopback address"),
        ('<metrics_endpoint address="localhost"/>', "'localhost' is not an IPv4 or IPv6"),
        ('<metrics_endpoint port="65536"/>', "port 65536 is out of range (allowed: 0 to 65535)"),
        ('<metrics_endpoint port="http"/>', "port 'http' is not an integer"),
        ('<metrics_endpoint allow_remote="maybe"/>', "allow_remote"),
    ],
)
def test_endpoint_config_errors(endpoint: str, reason: str) -> None:
    """Refusals name the file, the element's line and the reason."""
    with pytest.raises(ConfigError) as info:
        _load(endpoint)
    assert info.value.line == 8
    assert reason in str(info.value)
    assert str(info.value).startswith("t.conf:8:")


def test_upstream_dtd_does_not_know_the_element(golden: Path) -> None:
    """Our DTD only appends an optional element: upstream's grammar still holds for upstream
    configs, and ours accepts the extension (a config with it is ours alone)."""
    from lxml import etree

    from vhostmd_py.config import default_dtd_path

    ours = etree.DTD(str(default_dtd_path()))
    doc = etree.fromstring(CONFIG.format(endpoint="<metrics_endpoint/>").encode())
    assert ours.validate(doc)
    upstream = etree.DTD(str(golden / "upstream" / "configs" / "vhostmd.dtd"))
    assert not upstream.validate(doc)
    assert upstream.validate(etree.fromstring(CONFIG.format(endpoint="").encode()))


# --- health --------------------------------------------------------------------------


def _result(**kw: object) -> ActionResult:
    base: Dict[str, object] = {"returncode": 0, "stdout": b"1", "stdout_size": 1,
                               "stderr": b"", "duration": 0.01}
    base.update(kw)
    return ActionResult(**base)  # type: ignore[arg-type]


def test_health_counts_actions() -> None:
    """Started, failed (any unusable value), timed out; cancelled ones are not counted."""
    health = Health()
    health.record_actions([
        _result(),
        _result(returncode=3),
        _result(returncode=-9, timed_out=True),
        _result(returncode=None, spawn_error="EMFILE"),
        _result(returncode=None, cancelled=True),
    ])
    reading = health.read()
    assert (reading.actions, reading.action_failures, reading.action_timeouts) == (3, 3, 1)


def test_health_cycle_buckets() -> None:
    """A duration equal to a bound is in that bucket (le); past the last one: +Inf."""
    health = Health(buckets=(0.1, 1.0))
    for took in (0.05, 0.1, 0.5, 1.0, 7.0):
        health.record_cycle(took, vms=3)
    reading = health.read()
    assert reading.cycle_bucket_counts == (2, 2, 1)
    assert reading.cycles == 5
    assert reading.cycle_seconds_sum == pytest.approx(8.65)
    assert reading.vms == 3


# --- the collector over a Snapshot -----------------------------------------------------


@dataclass
class View:
    """The three things the collector reads from a Daemon (real records)."""

    last_snapshot: Snapshot | None = None
    health: Health = field(default_factory=Health)
    virtio_connections: int = 0


def _scrape(view: View) -> Dict[str, object]:
    registry = CollectorRegistry()
    registry.register(VhostmdCollector(view))
    text = generate_latest(registry).decode("utf-8")
    return {f.name: f for f in text_string_to_metric_families(text)}


def _snapshot(vms: List[VM]) -> Snapshot:
    host = render_metric("uint32", "Answer", b"42", None, None) + render_metric(
        "string", "Greeting", b'say "hi"\\', None, None
    )
    blocks = tuple(
        VmBlock(vm, render_metric("real64", "TotalCPUTime", b"2.5", vm, "s")
                + render_metric("string", "Ident", vm.name.encode(), vm, None))
        for vm in vms
    )
    return Snapshot(host=host, vms=blocks)


def test_odd_vm_name_is_one_label_value() -> None:
    """A real VM record whose name has a quote, a newline and braces: one label value."""
    odd = VM(7, ODD, "00000000-0000-4000-8000-000000000007")
    got = _scrape(View(_snapshot([odd, VM(8, "b", "u-8")])))
    samples = got["vhostmd_vm_total_cpu_time_seconds"].samples  # type: ignore[attr-defined]
    assert [(s.labels, s.value) for s in samples] == [
        ({"vm_uuid": odd.uuid, "vm_id": "7"}, 2.5),
        ({"vm_uuid": "u-8", "vm_id": "8"}, 2.5),
    ]
    names = got["vhostmd_vm"].samples  # type: ignore[attr-defined]
    assert [(s.name, s.labels) for s in names] == [
        ("vhostmd_vm_info", {"vm_uuid": odd.uuid, "vm_id": "7", "vm_name": ODD}),
        ("vhostmd_vm_info", {"vm_uuid": "u-8", "vm_id": "8", "vm_name": "b"}),
    ]
    ident = got["vhostmd_vm_ident"].samples[0]  # type: ignore[attr-defined]
    assert ident.name == "vhostmd_vm_ident_info"
    assert ident.labels["value"] == ODD
    greeting = got["vhostmd_host_greeting"].samples  # type: ignore[attr-defined]
    assert [s.labels for s in greeting] == [{"value": 'say "hi"\\'}]
    assert got["vhostmd_host_answer"].samples[0].value == 42  # type: ignore[attr-defined]


def test_hostile_config_names_and_collisions() -> None:
    """Config names with label syntax are sanitised; the first of colliding names wins."""
    vm = VM(1, "v", "u")
    host = (
        render_metric("uint32", 'x{a="b"} 1\n# EOF', b"1", None, None)
        + render_metric("uint32", "Foo", b"2", None, None)
        + render_metric("uint32", "foo", b"3", None, None)  # same family, same labels
        + render_metric("string", "FOO", b"s", None, None)  # same family name, other kind
        + render_metric("uint32", "Bad", b"12x", None, None)  # not a number: left out
    )
    got = _scrape(View(Snapshot(host=host, vms=(VmBlock(vm, b""),))))
    assert got["vhostmd_host_x_a_b_1_eof"].samples[0].value == 1  # type: ignore[attr-defined]
    assert [s.value for s in got["vhostmd_host_foo"].samples] == [2]  # type: ignore[attr-defined]
    assert "vhostmd_host_bad" not in got


def test_health_families_and_cache() -> None:
    """Health families always; values once a Snapshot exists, parsed once per Snapshot."""
    view = View(virtio_connections=4)
    view.health.record_cycle(0.2, vms=1)
    view.health.record_publish(False, 10.0)
    got = _scrape(view)
    assert got["vhostmd_virtio_channels_connected"].samples[0].value == 4  # type: ignore[attr-defined]
    assert got["vhostmd_publish_errors"].samples[0].value == 1  # type: ignore[attr-defined]
    assert "vhostmd_last_publish_timestamp_seconds" not in got
    assert not any(name.startswith(("vhostmd_host_", "vhostmd_vm_")) for name in got)
    hist = {s.name + str(s.labels.get("le", "")): s.value
            for s in got["vhostmd_cycle_duration_seconds"].samples}  # type: ignore[attr-defined]
    assert hist["vhostmd_cycle_duration_seconds_bucket0.1"] == 0
    assert hist["vhostmd_cycle_duration_seconds_bucket0.25"] == 1
    assert hist["vhostmd_cycle_duration_seconds_count"] == 1

    collector = VhostmdCollector(view)
    view.last_snapshot = _snapshot([VM(1, "v", "u")])
    first = list(collector.collect())[-3:]
    assert list(collector.collect())[-3:] == first  # the same parsed families, reused
    assert all(a is b for a, b in zip(first, list(collector.collect())[-3:]))
    view.last_snapshot = _snapshot([VM(1, "v", "u")])
    assert not any(a is b for a, b in zip(first, list(collector.collect())[-3:]))


def test_snapshot_families_skip_empty_blocks() -> None:
    """A VM without values yields only its name; a host without values nothing."""
    got = snapshot_families(Snapshot(host=b"", vms=(VmBlock(VM(1, "v", "u"), b""),)))
    assert [(f.name, [s.labels for s in f.samples]) for f in got] == [
        ("vhostmd_vm", [{"vm_uuid": "u", "vm_id": "1", "vm_name": "v"}])]
    assert snapshot_families(Snapshot(host=b"", vms=())) == []


def test_exposition_encodes_values_once_per_snapshot_and_format() -> None:
    """One # EOF at the end; values re-encoded only for a new Snapshot; both formats parse."""
    from prometheus_client.parser import text_string_to_metric_families as text_families

    from vhostmd_py.publish.endpoint import Exposition

    view = View(_snapshot([VM(1, ODD, "u-1")]))
    exposition = Exposition(VhostmdCollector(view))
    body, kind = exposition.render("application/openmetrics-text; version=1.0.0")
    assert kind.startswith("application/openmetrics-text")
    text = body.decode()
    assert text.count("# EOF") == 1 and text.endswith("# EOF\n")
    got = {f.name: f for f in text_string_to_metric_families(text)}
    assert got["vhostmd_vm"].samples[0].labels["vm_name"] == ODD  # type: ignore[attr-defined]
    view.health.record_cycle(0.3, vms=1)  # health is read on every render
    again, _ = exposition.render("application/openmetrics-text; version=1.0.0")
    assert again != body and again.endswith(body[body.index(b"# HELP vhostmd_host_"):])
    plain, kind = exposition.render(None)
    assert kind.startswith("text/plain") and b"# EOF" not in plain
    names = {f.name for f in text_families(plain.decode())}
    assert {"vhostmd_vm_ident_info", "vhostmd_cycle_duration_seconds"} <= names
    view.last_snapshot = _snapshot([VM(2, "other", "u-2")])
    fresh, _ = exposition.render("application/openmetrics-text; version=1.0.0")
    assert b'vm_name="other"' in fresh and b"u-1" not in fresh


def test_answers_reused_while_the_state_is_unchanged() -> None:
    """app() hands out the same bytes until health, channels or the Snapshot change; gzip too."""
    import gzip
    from email.message import Message

    from vhostmd_py.publish.endpoint import Exposition

    def headers(**fields: str) -> Message:
        message = Message()
        for name, value in fields.items():
            message[name.replace("_", "-")] = value
        return message

    view = View(_snapshot([VM(1, "v", "u-1")]))
    exposition = Exposition(VhostmdCollector(view))
    openmetrics = headers(Accept="application/openmetrics-text; version=1.0.0")
    status, first_headers, first = exposition.app(openmetrics)
    assert status == 200 and first_headers[0][1].startswith("application/openmetrics-text")
    assert exposition.app(openmetrics)[2] is first  # reused, not encoded again
    plain = exposition.app(headers())[2]
    assert plain is not first and b"# EOF" not in plain
    zipped = exposition.app(headers(Accept_Encoding="gzip"))
    assert ("Content-Encoding", "gzip") in zipped[1] and gzip.decompress(zipped[2]) == plain
    view.health.record_cycle(0.3, vms=1)
    again = exposition.app(openmetrics)[2]
    assert again is not first and again != first  # the health changed
    view.virtio_connections += 1
    third = exposition.app(openmetrics)[2]
    assert third != again
    view.last_snapshot = _snapshot([VM(1, "v", "u-1")])  # equal bytes, a new cycle
    fresh = exposition.app(openmetrics)[2]
    assert fresh is not third and fresh == third  # encoded again for the new Snapshot
    assert exposition.app(openmetrics)[2] is fresh


# --- values prepared between cycles ---------------------------------------------------

OM_ACCEPT = "application/openmetrics-text; version=1.0.0"


def _headers(**fields: str) -> Message:
    message = Message()
    for name, value in fields.items():
        message[name.replace("_", "-")] = value
    return message


def test_encode_families_gives_the_encoders_bytes() -> None:
    """Family by family, with a pause hook called before each: the same bytes, both formats."""
    from prometheus_client.exposition import generate_latest as text_latest

    from vhostmd_py.publish.endpoint import _Families, encode_families

    families = snapshot_families(_snapshot([VM(1, ODD, "u-1"), VM(2, "b", "u-2")]))
    calls: List[int] = []
    for encoder in (generate_latest, text_latest):
        calls.clear()
        got = encode_families(encoder, families, lambda: calls.append(1))
        assert got == encoder(_Families(families))  # type: ignore[arg-type]
        assert len(calls) == len(families)
    assert encode_families(generate_latest, []) == b"# EOF\n"


def test_prepared_bytes_equal_lazily_encoded_ones() -> None:
    """prepare() after a scrape asked for the format: the next scrape's bytes are the
    prepared ones (no encoding) and equal what the same scrape encodes lazily."""
    from vhostmd_py.publish.endpoint import Exposition

    view = View(_snapshot([VM(1, ODD, "u-1")]))
    prepared = Exposition(VhostmdCollector(view))
    lazy = Exposition(VhostmdCollector(view))
    for exposition in (prepared, lazy):
        exposition.app(_headers(Accept=OM_ACCEPT))
        exposition.app(_headers(Accept_Encoding="gzip"))
    view.last_snapshot = _snapshot([VM(2, "other", "u-2")])  # the next cycle
    view.health.record_cycle(0.3, vms=1)
    assert prepared.prepare(view.last_snapshot)
    assert prepared.preparations == 2  # OpenMetrics and the text format, once each
    answer = prepared.app(_headers(Accept=OM_ACCEPT))[2]
    assert prepared.app(_headers(Accept=OM_ACCEPT))[2] is answer  # the prepared answer
    assert answer == lazy.app(_headers(Accept=OM_ACCEPT))[2]
    assert b'vm_name="other"' in answer
    zipped = prepared.app(_headers(Accept_Encoding="gzip"))[2]
    assert gzip.decompress(zipped) == gzip.decompress(
        lazy.app(_headers(Accept_Encoding="gzip"))[2])
    assert prepared.prepare(view.last_snapshot) and prepared.preparations == 2  # nothing new


def test_nothing_prepared_without_a_recent_scrape() -> None:
    """No format asked for: nothing encoded; one asked for longer ago than RECENT: neither."""
    from vhostmd_py.publish.endpoint import RECENT, Exposition

    now = [1000.0]
    view = View(_snapshot([VM(1, "v", "u-1")]))
    exposition = Exposition(VhostmdCollector(view), clock=lambda: now[0])
    assert not exposition.prepare(view.last_snapshot)  # type: ignore[arg-type]
    exposition.app(_headers(Accept=OM_ACCEPT))
    view.last_snapshot = _snapshot([VM(1, "v", "u-1")])
    now[0] += RECENT + 1
    assert not exposition.prepare(view.last_snapshot)
    assert exposition.preparations == 0
    now[0] -= 2  # asked for within the window
    assert exposition.prepare(view.last_snapshot) and exposition.preparations == 1
    # A Snapshot that is no longer the last one is not prepared (a newer one is).
    older, view.last_snapshot = view.last_snapshot, _snapshot([VM(3, "w", "u-3")])
    assert not exposition.prepare(older)


def test_preparer_prepares_the_newest_snapshot_only() -> None:
    """Two Snapshots handed over while the thread is busy: only the newest is prepared."""
    from vhostmd_py.publish.endpoint import Exposition, Preparer, Quiet

    view = View(_snapshot([VM(1, "v", "u-1")]))
    quiet = Quiet()
    exposition = Exposition(VhostmdCollector(view), quiet=quiet)
    exposition.app(_headers(Accept=OM_ACCEPT))
    preparer = Preparer(exposition, quiet)
    first, newest = _snapshot([VM(1, "a", "u-1")]), _snapshot([VM(2, "b", "u-2")])
    preparer.notify(first)  # not started yet: as if busy with an earlier one
    view.last_snapshot = newest
    preparer.notify(newest)
    preparer.start()
    try:
        assert preparer.idle.wait(10)
        assert (preparer.prepared, exposition.preparations) == (1, 1)
        body = exposition.app(_headers(Accept=OM_ACCEPT))[2]
        assert b'vm_name="b"' in body and b'vm_name="a"' not in body
    finally:
        preparer.close()
    assert preparer._thread is None


def test_value_encodings_wait_while_a_cycle_runs() -> None:
    """A scrape needing values waits for the cycle's end; a cycle past pause_limit: no longer."""
    import threading
    import time

    from vhostmd_py.publish.endpoint import Exposition, Quiet

    view = View(_snapshot([VM(1, "v", "u-1")]))
    quiet = Quiet(pause_limit=30.0)
    exposition = Exposition(VhostmdCollector(view), quiet=quiet)
    exposition.app(_headers())  # values of this Snapshot encoded: answers need none
    quiet.cycle_started()
    view.health.record_cycle(0.1, vms=1)
    assert b"vhostmd_vm_info" in exposition.app(_headers())[2]  # health only: at once

    view.last_snapshot = _snapshot([VM(2, "new", "u-2")])  # published, the cycle still runs
    bodies: List[bytes] = []
    scrape = threading.Thread(target=lambda: bodies.append(exposition.app(_headers())[2]))
    scrape.start()
    scrape.join(0.3)
    assert scrape.is_alive() and not bodies  # waiting, not encoding beside the cycle
    quiet.cycle_ended()
    scrape.join(10)
    assert b'vm_name="new"' in bodies[0]

    quiet.pause_limit = 0.2  # a cycle stuck past its reads: encodings go on
    quiet.cycle_started()
    view.last_snapshot = _snapshot([VM(3, "stuck", "u-3")])
    began = time.monotonic()
    body = exposition.app(_headers())[2]
    assert 0.1 < time.monotonic() - began < 5 and b'vm_name="stuck"' in body
    quiet.close()  # closed: no wait at all
    quiet.cycle_started()
    quiet.pause_limit = 30.0
    view.last_snapshot = _snapshot([VM(4, "closing", "u-4")])
    assert b'vm_name="closing"' in exposition.app(_headers())[2]
