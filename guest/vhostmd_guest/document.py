"""The metrics document as a guest sees it: hardened parsing and typed metrics.

The document comes from a host we do not control (or from anything that
writes the right signature on a disk), so parsing is defensive: no network,
no DTD loading, no entity substitution, any DOCTYPE or entity declaration
refused outright (billion-laughs and XXE documents are inert), and a size
bound checked before the parser sees a byte.
"""

from __future__ import annotations

import enum
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple, Union

from lxml import etree

from vhostmd_py.safexml import safe_parser

from .errors import DocumentError, MetricNotFoundError, MetricValueError, VmIdentityError

log = logging.getLogger(__name__)

# SPEC 4: a disk is at most 256 MiB, so no disk document can be larger;
# SPEC 6: virtio replies over 16 MiB are refused.
MAX_DISK_DOCUMENT = 256 * 1024 * 1024
MAX_VIRTIO_DOCUMENT = 16 * 1024 * 1024

MetricValue = Union[int, float, str]


class MetricType(enum.IntEnum):
    """Value types, numbered as upstream's ``metric_type`` enum (libmetrics.h)."""

    INT32 = 0
    UINT32 = 1
    INT64 = 2
    UINT64 = 3
    REAL32 = 4
    REAL64 = 5
    STRING = 6

    @classmethod
    def from_name(cls, name: str) -> MetricType:
        """The type for a ``type=`` attribute; case-insensitive like upstream's strcasecmp."""
        try:
            return cls[name.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown metric type {name!r}") from None

    @property
    def type_name(self) -> str:
        """The attribute spelling: int32 ... string."""
        return self.name.lower()


class MetricContext(enum.IntEnum):
    """Contexts, numbered as upstream's ``metric_context`` enum."""

    HOST = 0
    VM = 1

    @property
    def context_name(self) -> str:
        """The attribute spelling: host or vm."""
        return self.name.lower()

    @classmethod
    def parse(cls, value: MetricContext | int | str) -> MetricContext:
        """A context from a member, upstream's number, or the spelling "host"/"vm"."""
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"{value!r} is not a metric context (host or vm)") from None
        return cls(value)


_INT_RANGES: Dict[MetricType, Tuple[int, int]] = {
    MetricType.INT32: (-(2**31), 2**31 - 1),
    MetricType.UINT32: (0, 2**32 - 1),
    MetricType.INT64: (-(2**63), 2**63 - 1),
    MetricType.UINT64: (0, 2**64 - 1),
}
# Strict forms: Python's int()/float() also accept "1_000", which no C reader
# would; upstream's atoi/atof silently accept "42abc" as 42, which we refuse.
_INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_REAL_RE = re.compile(
    r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)\Z", re.IGNORECASE
)
# Upstream hosts keep the action's trailing newline in the value
# (`<value>42\n</value>`, FACTS 2); our host strips it (SPEC 2 deviation).
# Both must read the same, so trailing whitespace is never part of a value.
_TRAILING = " \t\r\n"


def convert_value(name: str, type_name: str, text: str) -> MetricValue:
    """The typed value of ``text`` for a metric of type ``type_name`` (raises MetricValueError)."""
    try:
        mtype = MetricType.from_name(type_name)
    except ValueError as err:
        raise MetricValueError(name, type_name, text, str(err)) from err
    stripped = text.rstrip(_TRAILING)
    if mtype is MetricType.STRING:
        return stripped
    token = stripped.strip()
    if mtype in _INT_RANGES:
        if not _INT_RE.match(token):
            raise MetricValueError(name, type_name, text, "not a decimal integer")
        number = int(token, 10)
        low, high = _INT_RANGES[mtype]
        if not low <= number <= high:
            raise MetricValueError(name, type_name, text, f"out of range {low}..{high}")
        return number
    if not _REAL_RE.match(token):
        raise MetricValueError(name, type_name, text, "not a decimal number")
    real = float(token)
    if mtype is MetricType.REAL32 and math.isfinite(real):
        try:
            # Round to what a C float holds, as upstream's union member would.
            (real,) = struct.unpack("<f", struct.pack("<f", real))
        except OverflowError as err:
            raise MetricValueError(name, type_name, text, "out of range for real32") from err
    return real


@dataclass(frozen=True)
class Metric:
    """One ``<metric>`` element: name, declared type, context, raw and typed value."""

    name: str
    type_name: str
    context: MetricContext
    raw_value: str
    unit: str | None = None
    vm_id: int | None = None
    vm_uuid: str | None = None

    @property
    def type(self) -> MetricType:
        """The declared type (MetricValueError when the document names an unknown one)."""
        try:
            return MetricType.from_name(self.type_name)
        except ValueError as err:
            raise MetricValueError(self.name, self.type_name, self.raw_value, str(err)) from err

    @property
    def value(self) -> MetricValue:
        """int for int32..uint64 (range-checked), float for real32/real64, str for string."""
        return convert_value(self.name, self.type_name, self.raw_value)


def _refuse_declarations(data: bytes, source: str) -> None:
    # A metrics document never needs a DTD. Refusing the declarations before
    # parsing makes entity bombs and external entities inert whatever the
    # parser options; a UTF-16/32 document cannot hide one because such
    # encodings are refused too (upstream's libxml would read them, but
    # vhostmd only ever writes UTF-8/ASCII).
    if data.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\x00<", b"\x00<", b"<\x00")):
        raise DocumentError(source, "document is not UTF-8 (UTF-16/32 documents are refused)")
    for marker in (b"<!DOCTYPE", b"<!ENTITY"):
        if marker in data:
            raise DocumentError(
                source, f"document contains {marker.decode()} (DTDs and entities are refused)"
            )


def check_document(
    data: bytes, *, source: str, max_size: int = MAX_DISK_DOCUMENT
) -> etree._Element:
    """Parse ``data`` safely and return the root element; DocumentError if not acceptable."""
    if len(data) > max_size:
        raise DocumentError(
            source, f"document of {len(data)} bytes exceeds the {max_size}-byte bound"
        )
    _refuse_declarations(data, source)
    if not data.strip():
        # Upstream: libxml's "Document is empty" (len-zero case).
        raise DocumentError(source, "document is empty")
    try:
        root = etree.fromstring(data, safe_parser())
    except etree.XMLSyntaxError as err:
        raise DocumentError(source, f"not well-formed XML: {err}") from err
    except ValueError as err:  # lxml refuses some inputs (e.g. with an encoding) this way
        raise DocumentError(source, f"not well-formed XML: {err}") from err
    tree = root.getroottree()
    if tree.docinfo.internalDTD is not None or tree.docinfo.doctype:
        raise DocumentError(source, "document has a DOCTYPE (DTDs and entities are refused)")
    return root


def _text(element: etree._Element) -> str:
    if len(element) == 0:  # the usual case: plain text, no child elements
        return element.text or ""
    return "".join(
        t if isinstance(t, str) else t.decode("utf-8", "replace") for t in element.itertext()
    )


def _vm_id(text: str | None) -> int | None:
    if text is None or not _INT_RE.match(text.strip()):
        return None
    return int(text.strip(), 10)


def metrics_from_root(root: etree._Element, source: str) -> Tuple[Metric, ...]:
    """The ``<metric>`` children of ``<metrics>`` as Metric records, in document order."""
    if root.tag != "metrics":
        raise DocumentError(source, f"root element is <{root.tag}>, expected <metrics>")
    out: List[Metric] = []
    host, vm = MetricContext.HOST, MetricContext.VM
    for element in root.iterchildren("metric"):
        attrs = element.attrib
        context_name = (attrs.get("context") or "").strip().lower()
        name_el = value_el = None
        for child in element:  # one pass instead of two find() calls
            if child.tag == "name" and name_el is None:
                name_el = child
            elif child.tag == "value" and value_el is None:
                value_el = child
        if context_name not in ("host", "vm") or name_el is None:
            # Upstream's XPath lookup never matches such elements either.
            log.debug("%s: skipping <metric> without a name or a host/vm context", source)
            continue
        uuid = attrs.get("uuid")
        out.append(
            Metric(
                name=_text(name_el).strip(),
                type_name=attrs.get("type") or "",
                context=host if context_name == "host" else vm,
                raw_value="" if value_el is None else _text(value_el),
                unit=attrs.get("unit") or None,
                vm_id=_vm_id(attrs.get("id")),
                vm_uuid=uuid.strip().lower() if uuid else None,
            )
        )
    return tuple(out)


_Key = Tuple[MetricContext, Optional[str], str]


@dataclass(frozen=True)
class MetricsDocument:
    """A parsed metrics document: the bytes it came from and its metrics in order."""

    raw: bytes
    metrics: Tuple[Metric, ...]
    source: str = "metrics"
    # Built once per document so a lookup costs a dict access, not a scan
    # of every metric (a 1000-VM disk holds thousands).
    _index: Dict[_Key, Metric] = field(init=False, repr=False, compare=False)
    _uuids: Tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: Dict[_Key, Metric] = {}
        uuids: Dict[str, None] = {}
        for m in self.metrics:
            uuid = m.vm_uuid if m.context is MetricContext.VM else None
            # The first of duplicates wins, as a scan in document order would.
            index.setdefault((m.context, uuid, m.name), m)
            if uuid:
                uuids.setdefault(uuid, None)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_uuids", tuple(uuids))

    def __iter__(self) -> Iterator[Metric]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def vm_uuids(self) -> Tuple[str, ...]:
        """UUIDs of the VMs with vm-context metrics, in order of first appearance."""
        return self._uuids

    def host_metrics(self) -> Tuple[Metric, ...]:
        """The host-context metrics."""
        return tuple(m for m in self.metrics if m.context is MetricContext.HOST)

    def vm_metrics(self, uuid: str | None = None) -> Tuple[Metric, ...]:
        """The vm-context metrics of one VM (see resolve_vm for how it is chosen)."""
        chosen = self.resolve_vm(uuid)
        return tuple(
            m for m in self.metrics if m.context is MetricContext.VM and m.vm_uuid == chosen
        )

    def resolve_vm(self, uuid: str | None, *, strict: bool = True) -> str:
        """The UUID whose vm metrics a lookup uses.

        With ``uuid`` given and present: it. Otherwise, when the document holds
        exactly one VM: that VM (a virtio reply, or a one-VM host); with
        ``strict`` a given-but-absent uuid is an error instead. Upstream fails
        every vm lookup as soon as the disk holds two VMs (SPEC 6).
        """
        uuids = self._uuids
        wanted = uuid.strip().lower() if uuid else None
        if wanted is not None and wanted in uuids:
            return wanted
        if wanted is not None and strict:
            raise VmIdentityError(
                f"VM {wanted} has no metrics in this document (VMs present: "
                f"{', '.join(uuids) or 'none'})",
                uuids,
            )
        if len(uuids) == 1:
            return uuids[0]
        if not uuids:
            raise VmIdentityError("the document holds no vm metrics", uuids)
        raise VmIdentityError(
            f"the document holds {len(uuids)} VMs and this VM's UUID is unknown: "
            "pass vm_uuid (or make /sys/class/dmi/id/product_uuid readable)",
            uuids,
        )

    def get(
        self,
        name: str,
        context: MetricContext | str = MetricContext.HOST,
        *,
        uuid: str | None = None,
        strict_uuid: bool = True,
    ) -> Metric:
        """The metric ``name`` in ``context`` (for vm: of the VM chosen by resolve_vm)."""
        context = MetricContext.parse(context)
        if context is MetricContext.HOST:
            found = self._index.get((context, None, name))
            if found is None:
                raise MetricNotFoundError(name, "host")
            return found
        chosen = self.resolve_vm(uuid, strict=strict_uuid)
        found = self._index.get((context, chosen, name))
        if found is None:
            raise MetricNotFoundError(name, "vm", chosen)
        return found


def parse_document(
    data: bytes, *, source: str = "metrics", max_size: int = MAX_DISK_DOCUMENT
) -> MetricsDocument:
    """Check and parse a metrics document (DocumentError when it is not acceptable)."""
    root = check_document(data, source=source, max_size=max_size)
    return MetricsDocument(raw=bytes(data), metrics=metrics_from_root(root, source), source=source)
