"""vhostmd_py.publish.virtio.protocol: request parsing, reply framing, upstream's bytes."""

from __future__ import annotations

from pathlib import Path

from helpers.qemu import build_reply, disk_content, golden_cases, split_golden
from vhostmd_wire.protocol import (
    INVALID_REQUEST,
    NO_HOST_METRICS,
    REQUEST_CRLF,
    REQUEST_LF,
    REQUEST_MAX,
)

from vhostmd_py.publish.virtio.protocol import Request, advance, classify_request


def test_classify_golden_requests(upstream: Path) -> None:
    """Every golden request is judged as upstream replied to it; its prefixes are incomplete."""
    for name, fragments, reply in golden_cases(upstream):
        whole = b"".join(fragments)
        for cut in range(1, len(whole)):
            if b"\n\n" not in whole[:cut] and b"\r\n\r\n" not in whole[:cut]:
                assert classify_request(whole[:cut]) is Request.INCOMPLETE, (name, cut)
        if name.startswith("get_xml"):
            assert classify_request(whole) is Request.GET_XML, name
        elif name.startswith("invalid"):
            assert reply == INVALID_REQUEST
            assert classify_request(whole) is Request.INVALID, name


def test_classify_overlong() -> None:
    """511 bytes without a terminator are invalid (upstream hangs); 510 still wait."""
    assert REQUEST_MAX == 511
    assert classify_request(b"A" * 510) is Request.INCOMPLETE
    assert classify_request(b"A" * 511) is Request.INVALID
    assert classify_request(REQUEST_LF + REQUEST_LF) is Request.INVALID
    assert classify_request(REQUEST_CRLF) is Request.GET_XML
    assert classify_request(b"GET /metrics/XML\r\n") is Request.INCOMPLETE


def test_reply_layout_matches_golden(upstream: Path) -> None:
    """build_reply of the disk content's parts gives upstream's reply bytes exactly."""
    cases = [
        ("virtio/single/vbd-disk-same-run.img", "virtio/single/get_xml_lf.bin"),
        ("virtio/vmonly/vbd-disk-same-run.img", "virtio/vmonly/get_xml_lf.bin"),
    ]
    for img, reply in cases:
        host, vm_part = split_golden(disk_content(upstream / img))
        assert build_reply(host, vm_part) == (upstream / reply).read_bytes()
    host, _ = split_golden(disk_content(upstream / "virtio/vmonly/vbd-disk-same-run.img"))
    assert host == b""
    assert NO_HOST_METRICS in (upstream / "virtio/vmonly/get_xml_lf.bin").read_bytes()


def test_advance_partial_sends() -> None:
    """After any number of bytes sent, what is left is exactly the unsent tail."""
    parts = [b"<metrics>\n", b"host", b"", b"vm-block", b"</metrics>\n\n"]
    whole = b"".join(parts)
    for sent in range(len(whole) + 1):
        rest = advance([memoryview(p) for p in parts if p], sent)
        assert b"".join(bytes(m) for m in rest) == whole[sent:]
        assert all(len(m) for m in rest)


def test_exchange_flags_only_overlong_invalid_requests() -> None:
    """overlong is set for a full buffer without terminator, not for other invalid requests."""
    from vhostmd_py.publish.virtio.protocol import Exchange, Request

    ex = Exchange()
    assert ex.feed(b"GET /foo\n\n") is Request.INVALID and not ex.overlong
    assert ex.feed(b"A" * 510) is Request.INCOMPLETE and not ex.overlong
    assert ex.feed(b"A") is Request.INVALID and ex.overlong
    assert ex.feed(b"GET /metrics/XML\n\n") is Request.GET_XML and not ex.overlong
