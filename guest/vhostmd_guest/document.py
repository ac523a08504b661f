"""The metrics document as a guest sees it: hardened parsing and typed metrics.

The document comes from a host we do not control (or from anything that
writes the right signature on a disk), so parsing is defensive: no network,
no DTD loading, no entity substitution, any DOCTYPE or entity declaration
refused outright (billion-laughs and XXE documents are inert), and a size
bound checked before the parser sees a byte.
"""

import logging
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

from vhostmd_wire.document import (
    INT_RE,
    MAX_DISK_DOCUMENT,
    MAX_VIRTIO_DOCUMENT,
    Element,
    MetricContext,
    MetricType,
    MetricValue,
    parse_value,
    parse_xml,
)

from .errors import DocumentError, MetricNotFoundError, MetricValueError, VmIdentityError

__all__ = [
    "MAX_DISK_DOCUMENT",
    "MAX_VIRTIO_DOCUMENT",
    "Metric",
    "MetricContext",
    "MetricType",
    "MetricValue",
    "MetricsDocument",
    "check_document",
    "convert_value",
    "metrics_from_root",
    "parse_document",
]

log = logging.getLogger(__name__)


def convert_value(name: str, type_name: str, text: str) -> MetricValue:
    """The typed value of ``text`` for a metric of type ``type_name`` (raises MetricValueError)."""
    try:
        return parse_value(type_name, text)
    except ValueError as err:
        raise MetricValueError(name, type_name, text, str(err)) from err


class _MetricFields(NamedTuple):
    name: str
    type_name: str
    context: MetricContext
    raw_value: str
    unit: Optional[str]
    vm_id: Optional[int]
    vm_uuid: Optional[str]


class Metric(_MetricFields):
    """One ``<metric>`` element: name, declared type, context, raw and typed value."""

    __slots__ = ()

    def __new__(
        cls,
        name: str,
        type_name: str,
        context: MetricContext,
        raw_value: str,
        unit: Optional[str] = None,
        vm_id: Optional[int] = None,
        vm_uuid: Optional[str] = None,
    ) -> "Metric":
        return super().__new__(cls, name, type_name, context, raw_value, unit, vm_id, vm_uuid)

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


def check_document(data: bytes, *, source: str, max_size: int = MAX_DISK_DOCUMENT) -> Element:
    """Parse ``data`` safely and return the root element; DocumentError if not acceptable."""
    return parse_xml(data, source, max_size)


def _text(element: Element) -> str:
    if not element.children:  # the usual case: plain text, no child elements
        return element.text
    return "".join(element.itertext())


def _vm_id(text: Optional[str]) -> Optional[int]:
    if text is None or not INT_RE.match(text.strip()):
        return None
    return int(text.strip(), 10)


def metrics_from_root(root: Element, source: str) -> Tuple[Metric, ...]:
    """The ``<metric>`` children of ``<metrics>`` as Metric records, in document order."""
    if root.tag != "metrics":
        raise DocumentError(source, f"root element is <{root.tag}>, expected <metrics>")
    out: List[Metric] = []
    host, vm = MetricContext.HOST, MetricContext.VM
    for element in root:
        if element.tag != "metric":
            continue
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


class MetricsDocument:
    """A parsed metrics document: the bytes it came from and its metrics in order."""

    __slots__ = ("_index", "_uuids", "metrics", "raw", "source")

    def __init__(self, raw: bytes, metrics: Tuple[Metric, ...], source: str = "metrics") -> None:
        self.raw = raw
        self.metrics = metrics
        self.source = source
        # Built once per document so a lookup costs a dict access, not a scan
        # of every metric (a 1000-VM disk holds thousands).
        index: Dict[_Key, Metric] = {}
        uuids: Dict[str, None] = {}
        for m in self.metrics:
            uuid = m.vm_uuid if m.context is MetricContext.VM else None
            # The first of duplicates wins, as a scan in document order would.
            index.setdefault((m.context, uuid, m.name), m)
            if uuid:
                uuids.setdefault(uuid, None)
        self._index = index
        self._uuids = tuple(uuids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MetricsDocument):
            return NotImplemented
        return (self.raw, self.metrics, self.source) == (other.raw, other.metrics, other.source)

    def __hash__(self) -> int:
        return hash((self.raw, self.metrics, self.source))

    def __repr__(self) -> str:
        return f"MetricsDocument(source={self.source!r}, {len(self.metrics)} metrics)"

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

    def vm_metrics(self, uuid: Optional[str] = None) -> Tuple[Metric, ...]:
        """The vm-context metrics of one VM (see resolve_vm for how it is chosen)."""
        chosen = self.resolve_vm(uuid)
        return tuple(
            m for m in self.metrics if m.context is MetricContext.VM and m.vm_uuid == chosen
        )

    def resolve_vm(self, uuid: Optional[str], *, strict: bool = True) -> str:
        """The UUID whose vm metrics a lookup uses.

        With ``uuid`` given and present: it. Otherwise, when the document holds
        exactly one VM: that VM (a virtio reply, or a one-VM host); with
        ``strict`` a given-but-absent uuid is an error instead. Upstream fails
        every vm lookup as soon as the disk holds two VMs (docs/COMPATIBILITY.md, Guest).
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
        context: Union[MetricContext, str] = MetricContext.HOST,
        *,
        uuid: Optional[str] = None,
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
