"""The wire format's pure Python on its own (no host package): runs under CPython and pypy3.

The golden daemon images are the oracle here: what upstream's daemon wrote
must be exactly what vhostmd_wire.disk says a publish leaves.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vhostmd_wire import disk, protocol
from vhostmd_wire.document import check_value, parse_xml
from vhostmd_wire.errors import ChecksumError, DiskBusyError, DocumentError, VhostmdError

# Reproducible single-domain daemon images (FACTS.md section 2) and their disk sizes.
SINGLE_DOMAIN = {"basic-1k.img": 1024, "basic-64k.img": 65536, "edge-4k.img": 4096}


def _signed_sum(data: bytes) -> int:
    return sum(b - 256 if b >= 0x80 else b for b in data) % 2**32


@given(st.binary(max_size=3000))
def test_checksum_is_the_signed_char_sum(data: bytes) -> None:
    """The checksum sums bytes as signed chars, mod 2**32 (FACTS.md section 1)."""
    assert disk.checksum(data) == _signed_sum(data)


@given(st.tuples(*[st.integers(0, 2**32 - 1)] * 4))
def test_header_roundtrip(fields: tuple[int, int, int, int]) -> None:
    """pack/unpack are inverse; the layout is four big-endian uint32."""
    h = disk.Header(*fields)
    raw = disk.pack_header(h)
    assert raw == b"".join(f.to_bytes(4, "big") for f in fields)
    assert disk.unpack_header(raw) == h


def test_header_refuses_non_uint32() -> None:
    """Out-of-range fields are refused when the header is built."""
    with pytest.raises(ValueError, match="uint32"):
        disk.Header(disk.SIGNATURE, 0, 0, 2**32)


@pytest.mark.parametrize("image", sorted(SINGLE_DOMAIN))
def test_published_image_reproduces_the_daemon(upstream: Path, image: str) -> None:
    """created_image + published_image of the content == upstream's image, byte for byte."""
    raw = (upstream / "disks" / image).read_bytes()
    length = disk.unpack_header(raw).length
    content = raw[disk.HEADER_SIZE : disk.HEADER_SIZE + length]
    created = disk.created_image(SINGLE_DOMAIN[image])
    assert disk.published_image(created, content, 0) == raw


def test_published_image_clears_only_the_old_tail() -> None:
    """A shorter document zeroes what the longer one left; beyond it nothing changes."""
    image = disk.created_image(1024)[:-4] + b"JUNK"
    long_doc = disk.published_image(image, b"x" * 100, 0)
    short = disk.published_image(long_doc, b"y" * 10, 100)
    assert short[16:26] == b"y" * 10 and short[26:116] == bytes(90)
    assert short.endswith(b"JUNK")
    with pytest.raises(ValueError):
        disk.published_image(image, b"z" * 1009, 0)


@pytest.mark.parametrize("image", ["good.img", "utf8-1k-padded64k.img", "small-1k.img"])
def test_golden_reader_images_read_stably(upstream: Path, tmp_path: Path, image: str) -> None:
    """The pure-Python stable read returns the content bytes of the golden images."""
    path = tmp_path / image
    shutil.copyfile(upstream / "reader" / "images" / image, path)
    raw = path.read_bytes()
    length = disk.unpack_header(raw).length
    with disk.DiskReader(path) as reader:
        assert reader.read() == raw[16 : 16 + length]
        assert reader.read() == raw[16 : 16 + length]  # the buffer is reused


def test_busy_and_bad_checksum_images_fail_typed(upstream: Path) -> None:
    """busy.img times out, badsum.img fails the checksum: both are VhostmdError."""
    images = upstream / "reader" / "images"
    with pytest.raises(DiskBusyError) as busy:
        disk.read_disk(images / "busy.img", busy_timeout=0.1, retry_interval=0.02)
    with pytest.raises(ChecksumError) as bad:
        disk.read_disk(images / "badsum.img", busy_timeout=0.5, checksum_grace=0.1)
    assert isinstance(busy.value, VhostmdError) and isinstance(bad.value, VhostmdError)
    assert bad.value.expected != bad.value.actual


def test_virtio_reply_framing() -> None:
    """Reply = disk document restricted to the VM + one more newline; empty host -> comment."""
    assert protocol.virtio_reply(b"<h/>", b"<v/>") == b"<metrics>\n<h/><v/></metrics>\n\n"
    assert protocol.virtio_reply(b"", b"<v/>") == (
        b"<metrics>\n<!-- host metrics not available --><v/></metrics>\n\n"
    )
    assert protocol.virtio_reply(b"<h/>", b"") == protocol.document(b"<h/>") + b"\n"
    assert protocol.INVALID_REQUEST.endswith(protocol.REPLY_TERMINATOR)


@pytest.mark.parametrize(
    ("type_name", "text", "ok"),
    [
        ("int32", "2147483647", True),
        ("int32", "2147483648", False),
        ("uint64", "-1", False),
        ("real32", "1e39", False),
        ("real64", "nan", True),
        ("string", "anything", True),
        ("INT64", "42abc", False),
        ("bogus", "1", False),
    ],
)
def test_check_value(type_name: str, text: str, ok: bool) -> None:
    """The type rules the host checks before publishing and the guest converts with."""
    assert (check_value(type_name, text) is None) == ok


@pytest.mark.parametrize(
    "data",
    [
        b'<!DOCTYPE m [<!ENTITY a "aaaa">]><metrics>&a;</metrics>',
        b'<metrics xmlns:x="y">&ext;</metrics>',
        b"\xff\xfe<\x00m\x00/\x00>\x00",
        b"<metrics><a></metrics>",
        b"",
    ],
)
def test_parser_refuses_hostile_or_broken_documents(data: bytes) -> None:
    """DTDs, entities, UTF-16 and broken XML are DocumentError; nothing is expanded."""
    with pytest.raises(DocumentError):
        parse_xml(data, "test")


def test_parser_bounds_the_size_before_parsing() -> None:
    """A document over the bound is refused without being parsed."""
    with pytest.raises(DocumentError, match="exceeds"):
        parse_xml(b"<metrics>" + b" " * 100 + b"</metrics>", "test", max_size=50)
