"""Tests of vhostmd_guest.document: hardened parsing, typed values, lookups."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vhostmd_guest.document import (
    MAX_VIRTIO_DOCUMENT,
    MetricContext,
    MetricType,
    check_document,
    convert_value,
    parse_document,
)
from vhostmd_guest.errors import (
    DocumentError,
    MetricNotFoundError,
    MetricsError,
    MetricValueError,
    VmIdentityError,
)

FUZZ = settings(
    max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def _content(image: Path) -> bytes:
    raw = image.read_bytes()
    _sig, _busy, _sum, length = struct.unpack(">4I", raw[:16])
    return raw[16 : 16 + length]


def _doc(*metrics: str) -> bytes:
    return ("<metrics>\n" + "".join(metrics) + "</metrics>\n").encode()


def _m(name: str, type_: str, value: str, context: str = "host", extra: str = "") -> str:
    return (
        f"  <metric type='{type_}' context='{context}'{extra}>\n"
        f"    <name>{name}</name>\n    <value>{value}</value>\n  </metric>\n"
    )


def test_enum_values_follow_upstream_order() -> None:
    """MetricType/MetricContext numbers are upstream's C enum values."""
    assert [t.value for t in MetricType] == list(range(7))
    assert [t.type_name for t in MetricType] == [
        "int32", "uint32", "int64", "uint64", "real32", "real64", "string",
    ]  # fmt: skip
    assert (MetricContext.HOST, MetricContext.VM) == (0, 1)


def test_golden_basic_document_parses_with_typed_values(upstream: Path) -> None:
    """The upstream basic-1k document yields its metrics with typed values."""
    doc = parse_document(_content(upstream / "disks" / "basic-1k.img"))
    assert [m.name for m in doc] == ["First", "Second", "Greeting", "Answer", "VCpus", "Ident"]
    assert doc.get("Answer").value == 42
    assert doc.get("Second").value == 2  # upstream's "2\n" reads as 2
    assert doc.get("Greeting").value == "hello"
    vm = doc.get("Ident", MetricContext.VM)
    assert vm.vm_id == 1
    assert vm.vm_uuid == "6695eb01-f6a4-8304-79aa-97f2502e193f"
    assert vm.value == "test-1-6695eb01-f6a4-8304-79aa-97f2502e193f"
    assert doc.vm_uuids() == ("6695eb01-f6a4-8304-79aa-97f2502e193f",)


def test_golden_utf8_document_keeps_text(upstream: Path) -> None:
    """The UTF-8 golden document parses; its unit attribute and values survive."""
    doc = parse_document(_content(upstream / "disks" / "utf8-1k.img"))
    units = {m.unit for m in doc}
    assert "ünit" in units
    assert any("héllo" in str(m.raw_value) for m in doc)


@pytest.mark.parametrize(
    ("image", "why"),
    [
        ("rawxml-1k.img", "not well-formed"),  # upstream writes a<b&c raw
        ("negsum-1k.img", "not well-formed"),  # 0x80 bytes are not UTF-8
    ],
)
def test_golden_malformed_documents_refused(upstream: Path, image: str, why: str) -> None:
    """Documents upstream's libxml refused are refused here too, with a typed error."""
    with pytest.raises(DocumentError, match=why):
        check_document(_content(upstream / "disks" / image), source="t")


@pytest.mark.parametrize(
    ("type_", "text", "expected"),
    [
        ("int32", "-2147483648", -(2**31)),
        ("int32", "42\n", 42),
        ("uint32", "4294967295", 2**32 - 1),
        ("int64", "-9223372036854775808", -(2**63)),
        ("uint64", "18446744073709551615", 2**64 - 1),
        ("UINT64", " 7 ", 7),
        ("real64", "0.5\n", 0.5),
        ("real64", "1e3", 1000.0),
        ("real32", "0.1", struct.unpack("<f", struct.pack("<f", 0.1))[0]),
        ("string", "hello\n", "hello"),
        ("string", "  a b", "  a b"),
        ("string", "", ""),
    ],
)
def test_convert_value_typed(type_: str, text: str, expected: object) -> None:
    """Values convert to int/float/str by type, trailing newlines ignored."""
    value = convert_value("M", type_, text)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("type_", "text"),
    [
        ("int32", "2147483648"),
        ("uint32", "-1"),
        ("uint64", "18446744073709551616"),
        ("int32", "42abc"),  # upstream's atoi would say 42
        ("int32", "1_000"),  # Python's int() would accept it
        ("int32", ""),
        ("real64", "abc"),
        ("real64", "1_0.5"),
        ("real32", "1e39"),
        ("bogus", "1"),
        ("group", "1"),
    ],
)
def test_convert_value_refuses_bad_values(type_: str, text: str) -> None:
    """Out-of-range, malformed and unknown-type values raise MetricValueError."""
    with pytest.raises(MetricValueError) as info:
        convert_value("M", type_, text)
    assert info.value.name == "M"
    assert info.value.type_name == type_


def test_real_special_values() -> None:
    """nan and inf read like C's strtod does."""
    assert math.isnan(float(convert_value("M", "real64", "nan")))
    assert convert_value("M", "real32", "-inf") == float("-inf")


def test_lookup_picks_vm_by_uuid_and_fails_clearly() -> None:
    """vm lookups choose by UUID; several VMs without one is a VmIdentityError."""
    a = " id='1' uuid='AAAAAAAA-0000-4000-8000-000000000001'"
    b = " id='2' uuid='aaaaaaaa-0000-4000-8000-000000000002'"
    doc = parse_document(
        _doc(
            _m("Answer", "int32", "42"),
            _m("VCpus", "uint32", "1", "vm", a),
            _m("VCpus", "uint32", "2", "vm", b),
        )
    )
    assert doc.vm_uuids() == (
        "aaaaaaaa-0000-4000-8000-000000000001",
        "aaaaaaaa-0000-4000-8000-000000000002",
    )
    assert (
        doc.get("VCpus", MetricContext.VM, uuid="AAAAAAAA-0000-4000-8000-000000000002").value == 2
    )
    with pytest.raises(VmIdentityError) as info:
        doc.get("VCpus", MetricContext.VM)
    assert len(info.value.uuids) == 2
    with pytest.raises(VmIdentityError):
        doc.get("VCpus", MetricContext.VM, uuid="bbbbbbbb-0000-4000-8000-000000000009")
    with pytest.raises(MetricNotFoundError) as nf:
        doc.get("Nope", MetricContext.VM, uuid="aaaaaaaa-0000-4000-8000-000000000001")
    assert (nf.value.name, nf.value.context) == ("Nope", "vm")
    with pytest.raises(MetricNotFoundError):
        doc.get("VCpus", MetricContext.HOST)
    assert doc.get("Answer", MetricContext.HOST).value == 42


def test_single_vm_document_needs_no_uuid() -> None:
    """With exactly one VM (a virtio reply) vm lookups work without a UUID."""
    doc = parse_document(
        _doc(_m("TotalCPUTime", "real64", "12.75", "vm", " id='3' uuid='u-3'")),
        max_size=MAX_VIRTIO_DOCUMENT,
    )
    assert doc.get("TotalCPUTime", MetricContext.VM).value == 12.75
    # A hint that does not match (non-strict) still finds the only VM.
    assert doc.get("TotalCPUTime", MetricContext.VM, uuid="other", strict_uuid=False).vm_id == 3


def test_units_and_odd_elements() -> None:
    """Units are exposed; metrics without name or with an unknown context are skipped."""
    doc = parse_document(
        _doc(
            _m("Mem", "uint64", "5", "host", " unit='MiB'"),
            "  <metric type='int32' context='elsewhere'><name>X</name><value>1</value></metric>\n",
            "  <metric type='int32' context='host'><value>1</value></metric>\n",
            "  <!-- host metrics not available -->",
        )
    )
    assert [(m.name, m.unit) for m in doc] == [("Mem", "MiB")]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"   \n",
        b"this is not xml\n",
        b"<metrics><metric>",
        b"<metrics/>trailing",
        b"<metrics/>\n" + b"\x00" * 100,  # upstream's len-plus-100 image
        "<metrics>\ufeff</metrics>".encode("utf-16"),
    ],
)
def test_check_document_refuses_malformed(data: bytes) -> None:
    """Empty, garbage, truncated, NUL-padded and UTF-16 documents are DocumentErrors."""
    with pytest.raises(DocumentError):
        check_document(data, source="t")


def test_root_must_be_metrics_for_parsing() -> None:
    """parse_document wants a <metrics> root; check_document only well-formedness."""
    check_document(b"<other/>", source="t")
    with pytest.raises(DocumentError, match="expected <metrics>"):
        parse_document(b"<other/>")


def test_size_bound_checked_before_parsing() -> None:
    """A document over the bound is refused without being parsed."""
    with pytest.raises(DocumentError, match="exceeds"):
        check_document(b"<metrics>" + b" " * 100 + b"</metrics>", source="t", max_size=50)


XXE_FILE = b"""<?xml version="1.0"?>
<!DOCTYPE metrics [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<metrics><metric type='string' context='host'><name>X</name><value>&xxe;</value></metric></metrics>
"""
XXE_NET = b"""<!DOCTYPE metrics SYSTEM "http://127.0.0.1:9/evil.dtd"><metrics/>"""
BOMB = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + b"".join(
        b' <!ENTITY lol%d "%s">\n' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    + b"]>\n<metrics><metric type='string' context='host'><name>B</name>"
    + b"<value>&lol9;</value></metric></metrics>\n"
)
PARAM_ENTITY = b"""<!DOCTYPE m [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]><metrics/>"""


@pytest.mark.parametrize("data", [XXE_FILE, XXE_NET, BOMB, PARAM_ENTITY])
def test_hostile_documents_are_inert(data: bytes) -> None:
    """XXE, external DTD, parameter entities and entity bombs are refused, cheaply."""
    # PyPy has no tracemalloc: this bound is checked under CPython only.
    tracemalloc = pytest.importorskip("tracemalloc", exc_type=ImportError)
    tracemalloc.start()
    try:
        with pytest.raises(DocumentError, match="DTDs and entities are refused"):
            parse_document(data)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_entity_reference_without_declaration_is_not_expanded() -> None:
    """An undeclared entity reference is an error, never a file read."""
    with pytest.raises(DocumentError):
        parse_document(b"<metrics><metric><name>&xxe;</name></metric></metrics>")


# --- fuzzing -------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes_only_typed_errors(data: bytes) -> None:
    """Arbitrary bytes either parse or raise a MetricsError, nothing else."""
    try:
        doc = parse_document(data)
    except MetricsError:
        return
    for m in doc:
        try:
            value = m.value
        except MetricValueError:
            continue
        assert isinstance(value, (int, float, str))


_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), max_codepoint=0x2FF), max_size=30
)
_metric = st.tuples(
    st.sampled_from(["int32", "uint32", "int64", "uint64", "real32", "real64", "string", "x"]),
    st.sampled_from(["host", "vm", "other", ""]),
    _text,
    _text,
    st.booleans(),
)


def _render(items: list[tuple[str, str, str, str, bool]]) -> bytes:
    out = ["<metrics>\n"]
    for type_, ctx, name, value, escape in items:
        if escape:
            name = name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            value = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        out.append(_m(name, type_, value, ctx, " id='1' uuid='u'" if ctx == "vm" else ""))
    out.append("</metrics>\n")
    return "".join(out).encode("utf-8", "surrogatepass")


def _breaks(text: str, escaped: bool) -> bool:
    if not escaped and ("<" in text or "&" in text or "]]>" in text):
        return True
    return any(ord(ch) < 0x20 and ch not in "\t\n\r" for ch in text)


@FUZZ
@given(st.lists(_metric, max_size=8))
def test_fuzz_structured_documents(items: list[tuple[str, str, str, str, bool]]) -> None:
    """Generated documents parse (when escaped) and every value converts or fails typed."""
    data = _render(items)
    try:
        doc = parse_document(data)
    except DocumentError:
        # Only markup left unescaped or a control character may break it.
        assert any(_breaks(n + v, esc) for _t, _c, n, v, esc in items)
        return
    for m in doc:
        try:
            value = m.value
        except MetricValueError as err:
            assert err.name == m.name
            continue
        assert isinstance(value, (int, float, str))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("host", MetricContext.HOST),
        ("VM", MetricContext.VM),
        (1, MetricContext.VM),
        (MetricContext.HOST, MetricContext.HOST),
    ],
)
def test_context_parse_accepts_spellings(given: object, expected: MetricContext) -> None:
    """Contexts may be given as members, upstream's numbers or "host"/"vm"."""
    assert MetricContext.parse(given) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize("given", ["guest", "", 7])
def test_context_parse_refuses_others(given: object) -> None:
    """Anything else is a ValueError naming the value."""
    with pytest.raises(ValueError):
        MetricContext.parse(given)  # type: ignore[arg-type]
