"""One metrics cycle: config + running VMs -> Snapshot (sources, then render).

Every metric of the host and of every VM is collected concurrently (the
runner bounds how many actions run at once; a batch source such as the shell
actions gets all of its metrics in one call, not one task each), then
rendered (vhostmd_py.cycle.render, which owns the value rules and the bytes) in
upstream's order (docs/COMPATIBILITY.md): host metrics first, then each VM in the
order given (libvirt's listing order), and within each of them the metrics in
REVERSE config order, because upstream prepends each parsed metric to a list.

The action runner is passed in (the daemon makes it): this module never
imports the runner binding, so it loads no compiled module.

With a deadline (the daemon's cycles: docs/DESIGN.md, Concurrency) the
values are taken at the deadline at the latest: the shell source returns by
then with what is ready (its late actions run on, see ShellActionSource);
another source still working then is cancelled and its metrics left out.
Upstream waits for the slowest action, for ever if one hangs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Dict, List, Sequence, Tuple

from vhostmd_py.config import Config
from vhostmd_py.cycle.render import render_value, xml_validator
from vhostmd_py.cycle.snapshot import Snapshot, VmBlock
from vhostmd_py.sources.base import (
    PENDING,
    BatchMetricSource,
    MetricSource,
    RawValue,
    Request,
    ShellActionSource,
    SourceRegistry,
    describe,
)
from vhostmd_py.sources.vm import VM

if TYPE_CHECKING:
    from vhostmd_py.cycle.carry import Carry
    from vhostmd_py.sources.shell.runner import ActionRunner

log = logging.getLogger(__name__)

# Past the deadline, how long the shell source may take to hand over what is
# ready before the collector stops waiting for it (bookkeeping only).
DEADLINE_SLACK = 0.05


async def _single(source: MetricSource, request: Request) -> Sequence[RawValue]:
    metric, vm = request
    try:
        return [await source.collect(metric, vm)]
    except Exception:  # a faulty source must not cost the other metrics
        log.exception("Error retrieving %s: the source failed", describe(metric, vm))
        return [None]


async def _batch(
    source: BatchMetricSource, requests: List[Request], deadline: float | None
) -> Sequence[RawValue]:
    try:
        # The shell and built-in sources hand over what is ready by the
        # deadline (they take it as a keyword); another source is cancelled.
        if deadline is not None and getattr(source, "honours_deadline", False):
            return await source.collect_many(requests, deadline=deadline)  # type: ignore[call-arg]
        return await source.collect_many(requests)
    except Exception:  # a faulty source must not cost the other sources' metrics
        log.exception("Error retrieving %d metric(s): the source failed", len(requests))
        return [None] * len(requests)


async def _raw_values(
    registry: SourceRegistry, requests: List[Request], deadline: float | None = None
) -> List[RawValue]:
    """Every request's raw value: one call per batch source, one task per other request."""
    by_source: Dict[int, Tuple[MetricSource, List[int]]] = {}
    for place, (metric, _) in enumerate(requests):
        source = registry.source_for(metric)
        by_source.setdefault(id(source), (source, []))[1].append(place)
    calls: List[Awaitable[Sequence[RawValue]]] = []
    order: List[List[int]] = []
    for source, places in by_source.values():
        if isinstance(source, BatchMetricSource):
            calls.append(_batch(source, [requests[p] for p in places], deadline))
            order.append(places)
        else:
            calls.extend(_single(source, requests[p]) for p in places)
            order.extend([p] for p in places)
    values: List[RawValue] = [None] * len(requests)
    if deadline is None or not calls:
        # No calls (an empty <metrics/>): an empty document, every period as
        # upstream; asyncio.wait() refuses an empty set.
        outcomes = await asyncio.gather(*calls)
    else:
        tasks = [asyncio.ensure_future(c) for c in calls]
        try:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic())
                               + DEADLINE_SLACK)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        outcomes = []
        for places, task in zip(order, tasks):
            if task.done():
                outcomes.append(task.result())
                continue
            # A source that ignores the deadline: its metrics keep their last values.
            task.cancel()
            log.warning("Error retrieving %d metric(s): no value by the cycle's deadline",
                        len(places))
            outcomes.append([PENDING] * len(places))
    for places, got in zip(order, outcomes):
        for place, value in zip(places, got):
            values[place] = value
    return values


def _default_registry(config: Config, runner: ActionRunner) -> SourceRegistry:
    shell = ShellActionSource(runner, path=config.path)
    if not any(m.source is not None for m in config.metrics):
        return SourceRegistry(shell)
    # Without a daemon's libvirt connection: host values from /proc only.
    from vhostmd_py.sources.builtin.source import NativeSource, is_builtin

    return SourceRegistry(shell, [(is_builtin, NativeSource())])


async def collect(
    config: Config,
    vms: Sequence[VM],
    runner: ActionRunner,
    *,
    sources: SourceRegistry | None = None,
    deadline: float | None = None,
    carry: Carry | None = None,
) -> Snapshot:
    """Collect and render one cycle's metrics for the host and VMS (in their order).

    DEADLINE (time.monotonic()): values not ready by then are left out, or,
    with CARRY (kept across cycles), published with their last good value.
    """
    registry = sources or _default_registry(config, runner)
    validator = xml_validator()
    # Reverse config order, as upstream (it prepends to its metric list).
    host = tuple(m for m in reversed(config.metrics) if m.context == "host")
    per_vm = tuple(m for m in reversed(config.metrics) if m.context == "vm")
    requests: List[Request] = [(m, None) for m in host]
    for vm in vms:
        requests.extend((m, vm) for m in per_vm)
    raws = await _raw_values(registry, requests, deadline)
    rendered = [render_value(m, vm, raw, validator) for (m, vm), raw in zip(requests, raws)]
    if carry is not None:
        rendered = carry.settle(requests, raws, rendered)
    host_xml = b"".join(rendered[: len(host)])
    blocks: List[VmBlock] = []
    pos = len(host)
    for vm in vms:
        blocks.append(VmBlock(vm, b"".join(rendered[pos : pos + len(per_vm)])))
        pos += len(per_vm)
    return Snapshot(host=host_xml, vms=tuple(blocks))
