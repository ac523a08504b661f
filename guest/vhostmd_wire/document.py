"""The metrics document: hardened parsing (standard library only) and the metric type rules.

The document comes from a host the guest does not control (or from anything
that writes the right signature on a disk), so parsing is defensive, as
defusedxml does it with xml.parsers.expat: the size is bounded before the
parser sees a byte, UTF-16/32 and any DOCTYPE or entity declaration are
refused outright (billion-laughs and XXE documents are inert), external
entities are never resolved, and an undefined entity is a syntax error.

The type rules (int32 .. real64, string) are vhostmd_wire.values, re-exported
here.
"""

from typing import Callable, Dict, Iterator, List, Optional
from xml.parsers import expat

from .errors import DocumentError

# The type rules, for readers that import them with the parser.
from .values import INT_RE as INT_RE
from .values import MetricContext as MetricContext
from .values import MetricType as MetricType
from .values import MetricValue as MetricValue
from .values import check_value as check_value
from .values import parse_value as parse_value

# A disk is at most 256 MiB, so no disk document can be larger;
# Virtio replies over 16 MiB are refused.
MAX_DISK_DOCUMENT = 256 * 1024 * 1024
MAX_VIRTIO_DOCUMENT = 16 * 1024 * 1024


# --- the element tree ---------------------------------------------------------------


class Element:
    """One parsed element: tag, attributes in document order, text, children, tail.

    Comments are kept as Element with tag COMMENT (their text is the comment)
    so a document re-serialises as libxml would write it.
    """

    __slots__ = ("attrib", "children", "tag", "tail", "text")

    COMMENT = "!--"

    def __init__(self, tag: str, attrib: Dict[str, str]) -> None:
        self.tag = tag
        self.attrib = attrib
        self.text = ""
        self.tail = ""
        self.children: List[Element] = []

    def __iter__(self) -> Iterator["Element"]:
        return (c for c in self.children if c.tag != Element.COMMENT)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The attribute name, else default."""
        return self.attrib.get(name, default)

    def itertext(self) -> Iterator[str]:
        """The text of this element and its descendants, in document order."""
        if self.tag == Element.COMMENT:
            return
        yield self.text
        for child in self.children:
            yield from child.itertext()
            yield child.tail

    def tostring(self) -> bytes:
        """The element as libxml's xmlDocFormatDump writes it (ASCII, character references)."""
        out: List[str] = []
        self._write(out.append)
        return "".join(out).encode("ascii", "xmlcharrefreplace")

    def _write(self, emit: Callable[[str], object]) -> None:
        if self.tag == Element.COMMENT:
            emit(f"<!--{self.text}-->")
            return
        emit("<" + self.tag)
        for name, value in self.attrib.items():
            emit(f' {name}="{_escape_attr(value)}"')
        if not self.text and not self.children:
            emit("/>")
            return
        emit(">" + _escape_text(self.text))
        for child in self.children:
            child._write(emit)
            emit(_escape_text(child.tail))
        emit(f"</{self.tag}>")


def _escape_text(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")
    )


def _escape_attr(value: str) -> str:
    return _escape_text(value).replace('"', "&quot;").replace("\n", "&#10;").replace("\t", "&#9;")


# --- the hardened parser -------------------------------------------------------------


def _refuse_declarations(data: bytes, source: str) -> None:
    # A metrics document never needs a DTD. Refusing the declarations before
    # parsing makes entity bombs and external entities inert whatever the
    # parser does; a UTF-16/32 document cannot hide one because such
    # encodings are refused too (upstream's libxml would read them, but
    # vhostmd only ever writes UTF-8/ASCII).
    if data.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\x00<", b"\x00<", b"<\x00")):
        raise DocumentError(source, "document is not UTF-8 (UTF-16/32 documents are refused)")
    for marker in (b"<!DOCTYPE", b"<!ENTITY"):
        if marker in data:
            raise DocumentError(
                source, f"document contains {marker.decode()} (DTDs and entities are refused)"
            )


class _Forbidden(Exception):
    """Raised from an expat handler: the document declares a DTD or an entity."""


def _forbid(*args: object) -> int:
    raise _Forbidden()


class _TreeBuilder:
    def __init__(self) -> None:
        self.root: Optional[Element] = None
        self._stack: List[Element] = []
        self._last: Optional[Element] = None  # text after it goes to its tail

    def start(self, tag: str, attrs: List[str]) -> None:
        # ordered_attributes: [name, value, name, value ...] in document order.
        element = Element(tag, dict(zip(attrs[::2], attrs[1::2])))
        self._append(element)
        self._stack.append(element)
        self._last = None

    def _append(self, element: Element) -> None:
        if self._stack:
            self._stack[-1].children.append(element)
        elif self.root is None and element.tag != Element.COMMENT:
            self.root = element

    def end(self, tag: str) -> None:
        self._last = self._stack.pop()

    def data(self, text: str) -> None:
        if self._last is not None:
            self._last.tail += text
        elif self._stack:
            self._stack[-1].text += text

    def comment(self, text: str) -> None:
        if not self._stack:
            return  # outside the root: not part of the element
        element = Element(Element.COMMENT, {})
        element.text = text
        self._append(element)
        self._last = element


def parse_xml(data: bytes, source: str, max_size: int = MAX_DISK_DOCUMENT) -> Element:
    """Parse data safely and return the root element; DocumentError if not acceptable."""
    if len(data) > max_size:
        raise DocumentError(
            source, f"document of {len(data)} bytes exceeds the {max_size}-byte bound"
        )
    _refuse_declarations(data, source)
    if not data.strip():
        # Upstream: libxml's "Document is empty" (len-zero case).
        raise DocumentError(source, "document is empty")
    builder = _TreeBuilder()
    parser = expat.ParserCreate()
    parser.ordered_attributes = True
    parser.buffer_text = True
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    parser.CommentHandler = builder.comment
    # What defusedxml refuses: any DTD, entity declaration or external entity.
    parser.StartDoctypeDeclHandler = _forbid
    parser.EntityDeclHandler = _forbid
    parser.UnparsedEntityDeclHandler = _forbid
    parser.ExternalEntityRefHandler = _forbid
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    try:
        parser.Parse(bytes(data), True)
    except _Forbidden:
        raise DocumentError(
            source, "document has a DOCTYPE (DTDs and entities are refused)"
        ) from None
    except expat.ExpatError as err:
        raise DocumentError(source, f"not well-formed XML: {err}") from err
    if builder.root is None:
        raise DocumentError(source, "document is empty")
    return builder.root
