"""Tests of vhostmd_py.cycle.render: upstream's byte layout, escaping, XML-safe values, framing."""

from __future__ import annotations

import pytest

from vhostmd_py.cycle.render import (
    EMPTY_DOCUMENT,
    document,
    escape_attr,
    escape_text,
    open_tag,
    parse_document,
    render_metric,
    value_problem,
)
from vhostmd_py.cycle.snapshot import Snapshot, VmBlock
from vhostmd_py.sources.vm import VM

TEST_VM = VM(1, "test", "6695eb01-f6a4-8304-79aa-97f2502e193f")


def test_host_metric_layout() -> None:
    """Host metric: exactly upstream's lines and indentation (FACTS.md section 2)."""
    assert render_metric("int32", "Answer", b"42", None, None) == (
        b"  <metric type='int32' context='host'>\n"
        b"    <name>Answer</name>\n"
        b"    <value>42</value>\n"
        b"  </metric>\n"
    )


def test_vm_metric_layout_with_unit() -> None:
    """vm metric: attribute order type, context, id, uuid, unit (edge-4k VmUnit)."""
    assert render_metric("uint32", "VmUnit", b"1", TEST_VM, "KiB") == (
        b"  <metric type='uint32' context='vm' id='1' "
        b"uuid='6695eb01-f6a4-8304-79aa-97f2502e193f' unit='KiB'>\n"
        b"    <name>VmUnit</name>\n"
        b"    <value>1</value>\n"
        b"  </metric>\n"
    )


def test_unit_only_when_non_empty() -> None:
    """unit='' and no unit render the same: no unit attribute."""
    assert open_tag("string", None, "") == open_tag("string", None, None)
    assert b"unit" not in open_tag("string", None, "")
    assert open_tag("real64", None, "s") == b"  <metric type='real64' context='host' unit='s'>\n"


def test_empty_value() -> None:
    """Empty output renders <value></value> as upstream (edge-4k EmptyOutput)."""
    assert b"    <value></value>\n" in render_metric("string", "EmptyOutput", b"", None, None)


def test_text_escaping_deviation() -> None:
    """DEVIATION: & < > escaped in values and names (upstream wrote a<b&c raw)."""
    assert escape_text(b"a<b&c") == b"a&lt;b&amp;c"
    assert escape_text(b"x>y") == b"x&gt;y"
    assert escape_text(b"plain 42") == b"plain 42"
    xml = render_metric("string", "R&D <x>", b"a<b&c", None, None)
    assert b"<name>R&amp;D &lt;x&gt;</name>" in xml
    assert b"<value>a&lt;b&amp;c</value>" in xml


def test_attribute_escaping() -> None:
    """Quotes (and & <) are escaped in single-quoted attributes."""
    assert escape_attr("it's & <ok>") == b"it&apos;s &amp; &lt;ok&gt;"
    vm = VM(3, "x", "u'u")
    tag = open_tag("string", vm, "a'b")
    assert tag == b"  <metric type='string' context='vm' id='3' uuid='u&apos;u' unit='a&apos;b'>\n"


def test_rendered_document_parses_and_round_trips() -> None:
    """Whatever names, units and values, the document parses and gives them back."""
    values = [b"a<b&c", b'it\'s "quoted"', "h\u00e9llo \u00ff".encode(), b"tab\there\nline2", b""]
    vm = VM(7, "n'me", "00000000-0000-4000-8000-000000000007")
    host = b"".join(
        render_metric("string", f"N{i}<&>", v, None, "u'<&") for i, v in enumerate(values)
    )
    block = b"".join(render_metric("string", f"V{i}", v, vm, None) for i, v in enumerate(values))
    doc = document(Snapshot(host=host, vms=(VmBlock(vm, block),)))
    root = parse_document(doc)
    metrics = root.findall("metric")
    assert len(metrics) == 2 * len(values)
    for i, v in enumerate(values):
        assert metrics[i].findtext("name") == f"N{i}<&>"
        assert metrics[i].get("unit") == "u'<&"
        assert (metrics[i].findtext("value") or "").encode() == v
        vm_metric = metrics[len(values) + i]
        assert vm_metric.get("uuid") == vm.uuid
        assert vm_metric.get("id") == "7"
        assert (vm_metric.findtext("value") or "").encode() == v


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (b"42", None),
        (b"1.5\n2.5", None),
        (b"tab\tcr\r", None),
        ("h\u00e9llo".encode(), None),
        ("\U0001f600".encode(), None),
        (b"nul\x00", "control character"),
        (b"esc\x1b[31m", "control character"),
        (b"\x7f", None),
        (b"\x80" * 3, "invalid UTF-8"),
        (b"ok\xff\xfe", "invalid UTF-8"),
        (b"\xed\xa0\x80", "invalid UTF-8"),  # an encoded surrogate
        ("\ufffe".encode(), "non-character"),
    ],
)
def test_value_problem(value: bytes, problem: str | None) -> None:
    """Values that XML cannot carry are reported; everything else passes."""
    found = value_problem(value)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_empty_document_is_the_frame_alone() -> None:
    """No metrics: the document is upstream's head and tail only (what clears busy)."""
    assert EMPTY_DOCUMENT == b"<metrics>\n</metrics>\n"
    assert document(Snapshot(host=b"", vms=())) == EMPTY_DOCUMENT

