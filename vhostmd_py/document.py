"""Rendering of ``<metric>`` elements, byte for byte in upstream's layout.

Layout (FACTS section 2, SPEC section 3)::

      <metric type='T' context='host'[ unit='U']>\\n
        <name>N</name>\\n
        <value>V</value>\\n
      </metric>\\n

with ``id='ID' uuid='UUID'`` after the context for vm metrics. Values are
bytes (what the source produced); names and attributes come from the config
or libvirt and are str.

DEVIATION (SPEC section 3): upstream writes names and values raw, so a value
``a<b&c`` yields a document no parser accepts (disks/rawxml-1k.img). We escape
``& < >`` in text and additionally ``'`` in the single-quoted attributes.
Values that cannot be represented in XML at all (invalid UTF-8, C0 control
characters) are refused by :func:`value_problem`; the collector leaves such
metrics out, so the document always parses (upstream writes the raw bytes).
"""

from __future__ import annotations

import re

from lxml import etree

from .model import VM
from .safexml import safe_parser

_TEXT_ESCAPES = {ord("&"): "&amp;", ord("<"): "&lt;", ord(">"): "&gt;"}
_ATTR_ESCAPES = {**_TEXT_ESCAPES, ord("'"): "&apos;"}
_NEEDS_TEXT_ESCAPE = re.compile(rb"[&<>]")

# Characters XML 1.0 forbids (C0 controls but tab, LF, CR), as bytes ...
_BAD_ASCII = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# ... and the two non-characters a strict UTF-8 decode lets through.
_BAD_UNICODE = re.compile("[\ufffe\uffff]")


def escape_text(value: bytes) -> bytes:
    """Escape ``& < >`` in element content (bytes in, bytes out)."""
    if not _NEEDS_TEXT_ESCAPE.search(value):
        return value  # the common case: numbers and plain words
    return value.replace(b"&", b"&amp;").replace(b"<", b"&lt;").replace(b">", b"&gt;")


def escape_name(name: str) -> bytes:
    """Escape a metric name for element content, UTF-8 encoded."""
    return name.translate(_TEXT_ESCAPES).encode("utf-8")


def escape_attr(value: str) -> bytes:
    """Escape a value for a single-quoted attribute, UTF-8 encoded."""
    return value.translate(_ATTR_ESCAPES).encode("utf-8")


def value_problem(value: bytes) -> str | None:
    """Why these bytes cannot be an XML value, or None when they can."""
    bad = _BAD_ASCII.search(value)
    if bad is not None:
        return f"control character {bad.group()!r} at byte {bad.start()} is not allowed in XML"
    if value.isascii():
        return None
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"invalid UTF-8 at byte {err.start}"
    if _BAD_UNICODE.search(text):
        return "non-character U+FFFE/U+FFFF is not allowed in XML"
    return None


def open_tag(mtype: str, vm: VM | None, unit: str | None) -> bytes:
    """``  <metric type=... context=...[ id uuid][ unit]>\\n`` (attribute order as upstream)."""
    parts = [b"  <metric type='", escape_attr(mtype)]
    if vm is None:
        parts.append(b"' context='host'")
    else:
        parts += [
            b"' context='vm' id='",
            str(vm.id).encode("ascii"),
            b"' uuid='",
            escape_attr(vm.uuid),
            b"'",
        ]
    if unit:
        parts += [b" unit='", escape_attr(unit), b"'"]
    parts.append(b">\n")
    return b"".join(parts)


def render_metric(mtype: str, name: str, value: bytes, vm: VM | None, unit: str | None) -> bytes:
    """One ``<metric>`` element in upstream's layout; ``value`` must pass value_problem."""
    return b"".join(
        (
            open_tag(mtype, vm, unit),
            b"    <name>",
            escape_name(name),
            b"</name>\n    <value>",
            escape_text(value),
            b"</value>\n  </metric>\n",
        )
    )


def parse_document(content: bytes) -> etree._Element:
    """Parse a rendered document safely (used to check that ours always parses)."""
    return etree.fromstring(content, safe_parser())
