"""One metrics cycle: config + running VMs -> Snapshot.

Every metric of the host and of every VM is collected concurrently (the
runner bounds how many actions run at once; a batch source such as the shell
actions gets all of its metrics in one call, not one task each), then
rendered in upstream's
order (SPEC section 3): host metrics first, then each VM in the order given
(libvirt's listing order), and within each of them the metrics in REVERSE
config order, because upstream prepends each parsed metric to a list.

Value rules (SPEC section 2, with the DEVIATIONS):
- trailing spaces, tabs, CRs and newlines of a value are removed (SUSE's
  downstream patch; upstream keeps them: ``<value>42\\n</value>``);
- ``group``: the output is split on ``,``, the n-th token is the n-th
  variable's value with its trailing whitespace removed; extra tokens are
  ignored (upstream). A missing token leaves that variable out with a warning
  (upstream gives every variable the whole output). An EMPTY token is
  published as an empty value, like an action with empty output
  (``<value></value>``); upstream crashes with SIGSEGV on ``echo 1,,2``.
  The group's unit applies to every variable (FACTS edge-4k GU1/GU2);
- ``xml``: the output must be one or more ``<metric>`` elements valid against
  metric.dtd; it is inserted as is, ending with one newline; otherwise the
  metric is left out with a warning;
- a value that cannot be represented in XML (invalid UTF-8, control
  characters) is left out with a warning, so the document always parses
  (upstream writes the raw bytes).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Awaitable, Dict, List, Sequence, Tuple

from lxml import etree

from .actions import ActionRunner
from .config import Config, MetricSpec
from .document import render_metric, value_problem
from .model import VM, Snapshot, VmBlock
from .native.catalogue import device_metric_name
from .safexml import safe_parser
from .sources import (
    BatchMetricSource,
    MetricSource,
    PerDevice,
    RawValue,
    Request,
    ShellActionSource,
    SourceRegistry,
    describe,
)

log = logging.getLogger(__name__)

_TRAILING_WS = b" \t\r\n"


def default_metric_dtd_path() -> Path:
    """The shipped metric.dtd (package data)."""
    return Path(str(resources.files("vhostmd_py") / "data" / "metric.dtd"))


class XmlMetricValidator:
    """Checks an xml metric's output against metric.dtd (loaded once)."""

    def __init__(self, dtd_path: Path | None = None) -> None:
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


def _xml_validator() -> XmlMetricValidator:
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
    if raw is None:
        return b""
    if isinstance(raw, PerDevice):
        # A per-device built-in field: one element per device, named after it.
        return b"".join(
            render_value(replace(metric, name=device_metric_name(metric.name, dev)), vm, v,
                         validator)
            for dev, v in raw.values
        )
    value = raw.rstrip(_TRAILING_WS)
    if metric.type == "xml":
        problem = (validator or _xml_validator()).problem(value)
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
            parts.append(render_metric(var.type, var.name, token, vm, metric.unit))
        return b"".join(parts)
    problem = value_problem(value)
    if problem is not None:
        log.warning("%s left out: %s", describe(metric, vm), problem)
        return b""
    return render_metric(metric.type, metric.name, value, vm, metric.unit)


async def _single(source: MetricSource, request: Request) -> Sequence[RawValue]:
    metric, vm = request
    try:
        return [await source.collect(metric, vm)]
    except Exception:  # a faulty source must not cost the other metrics
        log.exception("Error retrieving %s: the source failed", describe(metric, vm))
        return [None]


async def _batch(source: BatchMetricSource, requests: List[Request]) -> Sequence[RawValue]:
    try:
        return await source.collect_many(requests)
    except Exception:  # a faulty source must not cost the other sources' metrics
        log.exception("Error retrieving %d metric(s): the source failed", len(requests))
        return [None] * len(requests)


async def _raw_values(registry: SourceRegistry, requests: List[Request]) -> List[RawValue]:
    """Every request's raw value: one call per batch source, one task per other request."""
    by_source: Dict[int, Tuple[MetricSource, List[int]]] = {}
    for place, (metric, _) in enumerate(requests):
        source = registry.source_for(metric)
        by_source.setdefault(id(source), (source, []))[1].append(place)
    calls: List[Awaitable[Sequence[RawValue]]] = []
    order: List[List[int]] = []
    for source, places in by_source.values():
        if isinstance(source, BatchMetricSource):
            calls.append(_batch(source, [requests[p] for p in places]))
            order.append(places)
        else:
            calls.extend(_single(source, requests[p]) for p in places)
            order.extend([p] for p in places)
    values: List[RawValue] = [None] * len(requests)
    for places, got in zip(order, await asyncio.gather(*calls)):
        for place, value in zip(places, got):
            values[place] = value
    return values


def _default_registry(config: Config, runner: ActionRunner) -> SourceRegistry:
    shell = ShellActionSource(runner, path=config.path)
    if not any(m.source is not None for m in config.metrics):
        return SourceRegistry(shell)
    # Without a daemon's libvirt connection: host values from /proc only.
    from .native.source import NativeSource, is_builtin

    return SourceRegistry(shell, [(is_builtin, NativeSource())])


async def collect(
    config: Config,
    vms: Sequence[VM],
    runner: ActionRunner,
    *,
    sources: SourceRegistry | None = None,
) -> Snapshot:
    """Collect and render one cycle's metrics for the host and VMS (in their order)."""
    registry = sources or _default_registry(config, runner)
    validator = _xml_validator()
    # Reverse config order, as upstream (it prepends to its metric list).
    host = tuple(m for m in reversed(config.metrics) if m.context == "host")
    per_vm = tuple(m for m in reversed(config.metrics) if m.context == "vm")
    requests: List[Request] = [(m, None) for m in host]
    for vm in vms:
        requests.extend((m, vm) for m in per_vm)
    raws = await _raw_values(registry, requests)
    rendered = [render_value(m, vm, raw, validator) for (m, vm), raw in zip(requests, raws)]
    host_xml = b"".join(rendered[: len(host)])
    blocks: List[VmBlock] = []
    pos = len(host)
    for vm in vms:
        blocks.append(VmBlock(vm, b"".join(rendered[pos : pos + len(per_vm)])))
        pos += len(per_vm)
    return Snapshot(host=host_xml, vms=tuple(blocks))
