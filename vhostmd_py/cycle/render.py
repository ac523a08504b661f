"""The metrics document's bytes: everything the host writes, rendered here and only here.

What this module owns (FACTS.md sections 2 and 4; docs/COMPATIBILITY.md, The metrics document):
- one metric's raw value -> its ``<metric>`` element(s) (render_value: the
  value rules of upstream with our DEVIATIONS, below, and in docs/COMPATIBILITY.md);
- the element layout and the escaping (render_metric);
- the disk document (document, EMPTY_DOCUMENT) and the virtio reply
  (reply_parts), framed with vhostmd_wire.protocol, the bytes the guest
  checks;
- the check that a rendered document parses (parse_document).

Element layout (FACTS.md section 2)::

      <metric type='T' context='host'[ unit='U']>\\n
        <name>N</name>\\n
        <value>V</value>\\n
      </metric>\\n

with ``id='ID' uuid='UUID'`` after the context for vm metrics. Values are
bytes (what the source produced); names and attributes come from the config
or libvirt and are str.

Value rules (with the DEVIATIONS of docs/COMPATIBILITY.md, Actions):
- trailing spaces, tabs, CRs and newlines of a value are removed (SUSE's
  downstream patch; upstream keeps them: ``<value>42\\n</value>``);
- ``group``: the output is split on ``,``, the n-th token is the n-th
  variable's value with its trailing whitespace removed; extra tokens are
  ignored (upstream). A missing token leaves that variable out with a warning
  (upstream gives every variable the whole output). An EMPTY token is
  published as an empty value, like an action with empty output
  (``<value></value>``); upstream crashes with SIGSEGV on ``echo 1,,2``.
  The group's unit applies to every variable (FACTS.md, edge-4k GU1/GU2);
- ``xml``: the output must be one or more ``<metric>`` elements valid against
  metric.dtd; it is inserted as is, ending with one newline; otherwise the
  metric is left out with a warning.

DEVIATION (docs/COMPATIBILITY.md): upstream writes names and values raw, so a value
``a<b&c`` yields a document no parser accepts (disks/rawxml-1k.img). We escape
``& < >`` in text and additionally ``'`` in the single-quoted attributes.
Values that cannot be represented in XML at all (invalid UTF-8, C0 control
characters) are refused by :func:`value_problem` and left out with a warning,
so the document always parses (upstream writes the raw bytes).

DEVIATION (docs/COMPATIBILITY.md, Actions): a value that does not fit its type (``abc`` or
an empty value for a uint32, ``-5`` for a uint32, ``99999999999`` for an
int32, ``1.5x`` for a real64) is left out with a warning naming the metric,
the VM and the value; upstream publishes it and the guest library then fails
on it. The type rules are vhostmd_wire.values.check_value, the ones the
guest parses with; ``string`` accepts anything value_problem accepts, and a
group's variables are checked against each variable's own type.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from typing import List, Mapping, Sequence, Tuple

from lxml import etree
from vhostmd_wire.protocol import DOC_HEAD, DOC_TAIL, virtio_reply_parts
from vhostmd_wire.values import check_value

from vhostmd_py.config import MetricSpec
from vhostmd_py.cycle.snapshot import Snapshot, VmBlock
from vhostmd_py.errors import StrPath
from vhostmd_py.safexml import safe_parser
from vhostmd_py.sources.base import Pending, PerDevice, RawValue, describe
from vhostmd_py.sources.vm import VM

log = logging.getLogger(__name__)

# What the disk holds before the first cycle and after a content too large
# for it was refused (daemon: clears upstream's busy flag).
EMPTY_DOCUMENT = DOC_HEAD + DOC_TAIL
_TRAILING_WS = b" \t\r\n"

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


def type_problem(mtype: str, value: bytes) -> str | None:
    """Why VALUE (already XML-safe) does not fit type MTYPE, or None when it does."""
    return check_value(mtype, value.decode("utf-8"))


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


def default_metric_dtd_path() -> str:
    """The shipped metric.dtd (package data)."""
    # Beside the package, with os.path: importlib.resources costs the daemon
    # ~2 MB of RSS (zipfile, tempfile), pathlib ~1 MB (urllib.parse,
    # ipaddress; bench/bench_footprint.py), and the package is never
    # installed zipped (it has compiled modules).
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                        "metric.dtd")


class XmlMetricValidator:
    """Checks an xml metric's output against metric.dtd (loaded once)."""

    def __init__(self, dtd_path: StrPath | None = None) -> None:
        path = dtd_path or default_metric_dtd_path()
        with open(path, "rb") as fh:
            self._dtd = etree.DTD(fh)
        self._parser = safe_parser()

    def problem(self, output: bytes) -> str | None:
        """Why OUTPUT is not a sequence of valid <metric> elements, or None."""
        try:
            root = etree.fromstring(b"<metrics>" + output + b"</metrics>", self._parser)
        except etree.XMLSyntaxError as err:
            return f"not well-formed XML: {err.msg}"
        if root.text and root.text.strip():
            return "text outside <metric> elements"
        count = 0
        for child in root:
            if not isinstance(child.tag, str):
                return "comments or processing instructions are not allowed"
            if child.tail and child.tail.strip():
                return "text outside <metric> elements"
            if child.tag != "metric":
                return f"<{child.tag}> is not a <metric> element"
            if not self._dtd.validate(child):
                entry = next(iter(self._dtd.error_log), None)  # type: ignore[call-overload]
                return f"invalid against metric.dtd: {entry.message if entry else 'invalid'}"
            count += 1
        if count == 0:
            return "no <metric> element"
        return None


_VALIDATOR: XmlMetricValidator | None = None


def xml_validator() -> XmlMetricValidator:
    """The shared validator of the shipped metric.dtd (loaded on first use)."""
    global _VALIDATOR
    if _VALIDATOR is None:
        _VALIDATOR = XmlMetricValidator()
    return _VALIDATOR


def render_value(
    metric: MetricSpec,
    vm: VM | None,
    raw: RawValue,
    validator: XmlMetricValidator | None = None,
) -> bytes:
    """The <metric> element(s) for one metric's raw value (b"" when left out)."""
    if raw is None or isinstance(raw, Pending):
        return b""
    if isinstance(raw, PerDevice):
        # A per-device built-in field: one element per device, named after it.
        # (Imported here: only configs with built-in sources have such values.)
        from vhostmd_py.sources.builtin.catalogue import device_metric_name

        return b"".join(
            render_value(
                replace(metric, name=device_metric_name(metric.name, dev)), vm, v, validator
            )
            for dev, v in raw.values
        )
    value = raw.rstrip(_TRAILING_WS)
    if metric.type == "xml":
        problem = (validator or xml_validator()).problem(value)
        if problem is not None:
            log.warning(
                "Validation of XML returned by %s failed: %s", describe(metric, vm), problem
            )
            return b""
        return value + b"\n"
    if metric.type == "group":
        tokens = value.split(b",")
        parts: List[bytes] = []
        for index, var in enumerate(metric.variables):
            if index >= len(tokens):
                log.warning(
                    "%s: no value for variable %s: output has %d comma-separated token(s) "
                    "for %d variables",
                    describe(metric, vm),
                    var.name,
                    len(tokens),
                    len(metric.variables),
                )
                continue
            token = tokens[index].rstrip(_TRAILING_WS)
            problem = value_problem(token)
            if problem is not None:
                log.warning("%s: variable %s left out: %s", describe(metric, vm), var.name, problem)
                continue
            problem = type_problem(var.type, token)
            if problem is not None:
                log.warning(
                    "%s: variable %s left out: value %r is not a valid %s: %s",
                    describe(metric, vm),
                    var.name,
                    token.decode("utf-8"),
                    var.type,
                    problem,
                )
                continue
            parts.append(render_metric(var.type, var.name, token, vm, metric.unit))
        return b"".join(parts)
    problem = value_problem(value)
    if problem is not None:
        log.warning("%s left out: %s", describe(metric, vm), problem)
        return b""
    problem = type_problem(metric.type, value)
    if problem is not None:
        log.warning(
            "%s left out: value %r is not a valid %s: %s",
            describe(metric, vm),
            value.decode("utf-8"),
            metric.type,
            problem,
        )
        return b""
    return render_metric(metric.type, metric.name, value, vm, metric.unit)


@dataclass(frozen=True)
class ExtraMetric:
    """A metric the daemon adds to a cycle's snapshot (history, alarms, accounting)."""

    name: str
    type: str
    unit: str | None
    value: str  # the value's text


def _extra_xml(metrics: Sequence[ExtraMetric], vm: VM | None) -> bytes:
    out = []
    for m in metrics:
        value = m.value.encode("utf-8")
        problem = value_problem(value)
        if problem is not None:
            log.warning("metric %s left out: %s", m.name, problem)
            continue
        out.append(render_metric(m.type, m.name, value, vm, m.unit))
    return b"".join(out)


def append_metrics(
    snapshot: Snapshot,
    host: Sequence[ExtraMetric],
    vms: Mapping[str, Sequence[ExtraMetric]],
) -> Snapshot:
    """SNAPSHOT with HOST appended to the host part and VMS[uuid] to that VM's block only.

    A VM's metrics can only ever land in its own block: they are keyed by its
    UUID (a VM without a block gets none; the caller decides whether to add
    one). The same snapshot comes back when nothing is added.
    """
    host_xml = _extra_xml(host, None)
    blocks = []
    changed = bool(host_xml)
    for block in snapshot.vms:
        extra = _extra_xml(vms.get(block.vm.uuid, ()), block.vm)
        if extra:
            changed = True
            block = VmBlock(block.vm, block.xml + extra)
        blocks.append(block)
    if not changed:
        return snapshot
    return replace(snapshot, host=snapshot.host + host_xml, vms=tuple(blocks))


def document(snapshot: Snapshot) -> bytes:
    """The metrics document as written to the vbd disk: host metrics, then each VM's block."""
    return b"".join((DOC_HEAD, snapshot.host, *(b.xml for b in snapshot.vms), DOC_TAIL))


def reply_parts(host: bytes, vm_xml: bytes) -> Tuple[bytes, bytes, bytes, bytes]:
    """The pieces of a virtio reply, in order: sent as one sendmsg, never joined per channel.

    Upstream vio_channel_update: the host part, or upstream's comment when it
    is empty, then this VM's block (vhostmd_wire.protocol, FACTS.md section 4)."""
    return virtio_reply_parts(host, vm_xml)
