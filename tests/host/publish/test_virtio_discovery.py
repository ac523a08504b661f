"""vhostmd_py.publish.virtio.discovery: libvirt's channel directories, matched to VMs."""

from __future__ import annotations

from typing import Tuple

import pytest

from vhostmd_py.publish.virtio.discovery import name_matches, parse_channel_dir


@pytest.mark.parametrize(
    ("entry", "parsed"),
    [
        (b"domain-1-test", (1, b"test")),
        (b"1-test", (1, b"test")),
        (b"domain-12-a-b", (12, b"a-b")),
        (b"123-domain-4-x", (123, b"domain-4-x")),
        (b"domain-0-x", None),
        (b"0-x", None),
        (b"domain-x-1", None),
        (b"domain-1-", None),
        (b"-1-test", None),
        (b"org.github.vhostmd.1", None),
        (b"1test", None),
    ],
)
def test_parse_channel_dir(entry: bytes, parsed: Tuple[int, bytes] | None) -> None:
    """Both libvirt naming schemes parse; anything else is ignored."""
    assert parse_channel_dir(entry) == parsed


def test_name_matches_libvirt_short_names() -> None:
    """A name matches itself or libvirt's 20-character short form, nothing else."""
    long = "a-very-long-domain-name-indeed"
    assert name_matches(b"test", "test")
    assert name_matches(long[:20].encode(), long)
    assert not name_matches(long[:19].encode(), long)
    assert not name_matches(b"tes", "test")
    assert not name_matches(b"wrongname", "vm0003")
    uni = "dom\u00e4ne-mit-umlauten-und-mehr"
    assert name_matches(uni[:20].encode(), uni)  # 20 characters (UTF-8 locale)
    assert name_matches(uni.encode()[:20], uni)  # 20 bytes (C locale)
