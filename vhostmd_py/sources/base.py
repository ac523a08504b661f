"""Pluggable sources of metric values, so built-in ones can stand beside shell actions.

A source turns a metric (and a VM, for vm context) into the raw value bytes,
or None when it failed (the source logs why, naming the metric and the VM).
Everything after that (trailing-whitespace strip, group splitting, xml
validation, escaping, layout) is the collector's and the renderer's job, so a
built-in source (the libvirt API, /proc) can stand beside shell actions
without touching rendering or transports: give it to a SourceRegistry route.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Callable,
    Dict,
    List,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
    runtime_checkable,
)

from vhostmd_py.config import MetricSpec
from vhostmd_py.errors import ActionError
from vhostmd_py.sources.shell import VALUE_CAP, XML_VALUE_CAP
from vhostmd_py.sources.shell.substitution import substitute
from vhostmd_py.sources.vm import VM

if TYPE_CHECKING:  # the runner binding loads _runner: only code running actions imports it
    from vhostmd_py.sources.shell.runner import ActionJob, ActionResult, ActionRunner

log = logging.getLogger(__name__)

# One metric to produce: host context when the VM is None.
Request = Tuple[MetricSpec, Optional[VM]]


@dataclass(frozen=True)
class PerDevice:
    """The values of a per-device built-in field: one element per (device name, raw value).

    The collector renders one <metric> per device, named after the device
    (vhostmd_py.sources.builtin.catalogue.device_metric_name).
    """

    values: Tuple[Tuple[str, bytes], ...]


class Pending:
    """The answer of a source still reading at the cycle's deadline (not a failure).

    The cycle publishes the metric's last good value instead (vhostmd_py.cycle.carry).
    """

    _instance: Pending | None = None

    def __new__(cls) -> Pending:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "PENDING"


PENDING = Pending()

# A source's answer: value bytes, values per device, None (left out, logged),
# or PENDING (still being read at the deadline).
RawValue = Union[bytes, PerDevice, None, Pending]


class MetricSource(Protocol):
    """Produces one metric's raw value."""

    async def collect(self, metric: MetricSpec, vm: VM | None) -> RawValue:
        """The value bytes, or None after logging why there is none."""
        ...


@runtime_checkable
class BatchMetricSource(MetricSource, Protocol):
    """A source that serves a whole cycle's requests in one call (cheaper per metric)."""

    async def collect_many(self, requests: Sequence[Request]) -> Sequence[RawValue]:
        """collect() for each (metric, vm) of REQUESTS, in order."""
        ...


def describe(metric: MetricSpec, vm: VM | None) -> str:
    """`metric X` or `metric X of VM name (id N)`, for log lines."""
    if vm is None:
        return f"metric {metric.name}"
    return f"metric {metric.name} of VM {vm.name!r} (id {vm.id})"


def trim_partial_utf8(value: bytes) -> bytes:
    """Drop an incomplete UTF-8 sequence that a byte cap cut at the end.

    DEVIATION: upstream keeps the cut bytes, which makes the value invalid
    UTF-8; ours would then be left out whole, so drop the partial character.
    """
    if value.isascii():
        return value
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as err:
        # Only a sequence cut by the end of the buffer, not invalid bytes inside.
        if err.reason == "unexpected end of data" and err.start >= len(value) - 3:
            return value[: err.start]
    return value


# A (metric, VM) pair: whose action is running. The VM by uuid and id (a
# restarted domain keeps its uuid but is a new run); None for the host.
Key = Tuple[MetricSpec, Optional[Tuple[str, int]]]


@dataclass
class _Late:
    """An action still running after the deadline of the cycle that started it."""

    job: ActionJob
    since: float  # time.time() at its start, for the log
    cap: int
    what: str  # describe(metric, vm)


def _key(metric: MetricSpec, vm: VM | None) -> Key:
    return (metric, None if vm is None else (vm.uuid, vm.id))


class ShellActionSource:
    """The default source: the metric's ``<action>`` run by ``/bin/sh`` (as ``sh -c`` would).

    Keeps the first 255 bytes of the output (2047 for xml metrics) as
    upstream's single read() does (FACTS.md section 2, edge-4k `Long`).

    With a deadline (the daemon's cycles), collect_many() returns by then
    with the values that are ready; an action still running is PENDING (the
    cycle publishes its last value) and keeps running under its timeout
    (upstream waits for it, for ever if it hangs). While it runs its
    (metric, VM) is not started again: the next cycles wait for the same
    action, and use its value as soon as it has ended, by their deadline or
    between two cycles (then the cycle after starts a fresh one). One log
    line when such a streak starts, one when it ends. The daemon keeps one
    source across cycles for this.
    """

    # collect_many(requests, deadline=...) returns by the cycle's deadline.
    honours_deadline = True

    def __init__(self, runner: ActionRunner, *, path: str | None = None) -> None:
        self.runner = runner
        self.path = path
        self._late: Dict[Key, _Late] = {}
        self._lingered: set[Key] = set()

    @property
    def running_late(self) -> int:
        """How many actions of earlier cycles are still running."""
        return len(self._late)

    async def collect(self, metric: MetricSpec, vm: VM | None) -> RawValue:
        """Run the metric's action for VM (None: host) and return its capped output."""
        return (await self.collect_many([(metric, vm)]))[0]

    async def collect_many(
        self, requests: Sequence[Request], *, deadline: float | None = None
    ) -> List[RawValue]:
        """collect() for each (metric, vm), all run as one batch of actions.

        DEADLINE (time.monotonic()): return by then, PENDING for the actions
        still running; None waits for every action.
        """
        self._forget_ended({_key(metric, vm) for metric, vm in requests})
        values: List[RawValue] = [None] * len(requests)
        commands: List[Tuple[str, int]] = []
        places: List[int] = []
        joined: List[Tuple[int, _Late]] = []
        for place, (metric, vm) in enumerate(requests):
            late = self._late.get(_key(metric, vm)) if self._late else None
            if late is not None:
                joined.append((place, late))  # still running: wait for it, do not start it again
                continue
            try:
                command = substitute(metric.action, vm, self.runner.uri, metric=metric.name)
            except ActionError as err:
                log.warning("Error retrieving %s: %s", describe(metric, vm), err.reason)
                continue
            commands.append((command, XML_VALUE_CAP if metric.type == "xml" else VALUE_CAP))
            places.append(place)
        if deadline is None and not joined:
            results = await self.runner.run_many(commands, path=self.path)
            for place, (_, cap), result in zip(places, commands, results):
                metric, vm = requests[place]
                values[place] = self._use(metric, vm, cap, result)
            return values
        started = time.time()
        jobs = self.runner.submit_many(commands, path=self.path)
        waited = jobs + [late.job for _, late in joined]
        try:
            pending = [j.future for j in waited if not j.done()]
            if pending:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                await asyncio.wait(pending, timeout=timeout)
        except asyncio.CancelledError:
            await self.runner.cancel(waited)
            raise
        # Jobs C has ended while others of their batch still run.
        self.runner.collect_ready([j for j in waited if not j.done()])
        for place, (_, cap), job in zip(places, commands, jobs):
            metric, vm = requests[place]
            if job.done():
                values[place] = self._use(metric, vm, cap, self.runner.result_of(job))
            else:
                self._start_streak(metric, vm, _Late(job, started, cap, describe(metric, vm)))
                values[place] = PENDING
        for place, late in joined:
            metric, vm = requests[place]
            if late.job.done():
                self._end_streak(_key(metric, vm), late)
                values[place] = self._use(metric, vm, late.cap, self.runner.result_of(late.job))
            else:
                values[place] = PENDING
        return values

    def _use(
        self, metric: MetricSpec, vm: VM | None, cap: int, result: ActionResult
    ) -> bytes | None:
        if result.lingered:
            key = _key(metric, vm)
            if key not in self._lingered:  # once per (metric, VM): it does it every cycle
                self._lingered.add(key)
                log.warning(
                    "%s: the action exited but left processes holding its output; "
                    "its value is what it wrote within %.1f s, what it left was killed",
                    describe(metric, vm),
                    self.runner.linger or 0.0,
                )
        return self._value(metric, vm, cap, result)

    def _start_streak(self, metric: MetricSpec, vm: VM | None, late: _Late) -> None:
        self._late[_key(metric, vm)] = late
        log.warning(
            "Error retrieving %s: action still running at the cycle's deadline "
            "(since %s); left out, not restarted until it ends",
            late.what,
            time.strftime("%H:%M:%S", time.localtime(late.since)),
        )

    def _end_streak(self, key: Key, late: _Late) -> None:
        self._late.pop(key, None)
        result = self.runner.result_of(late.job)
        log.warning(
            "%s: the action running since %s has ended after %.1f s (%s)",
            late.what,
            time.strftime("%H:%M:%S", time.localtime(late.since)),
            result.duration,
            result.failure() or "ok",
        )

    def _forget_ended(self, asked: set[Key]) -> None:
        """Drop late actions that ended and that this cycle does not ask for.

        An ended one that is asked for gives this cycle its value (at most a
        period old: fresher than the carried one).
        """
        if not self._late:
            return
        self.runner.collect_ready([late.job for late in self._late.values()])
        for key, late in list(self._late.items()):
            if late.job.done() and key not in asked:
                self._end_streak(key, late)

    @staticmethod
    def _value(metric: MetricSpec, vm: VM | None, cap: int, result: ActionResult) -> bytes | None:
        reason = result.failure()
        if reason is not None:
            stderr = result.stderr.decode("utf-8", "replace").strip()
            # Upstream's line is "Error retrieving metric <name>"; keep it first.
            log.warning(
                "Error retrieving %s: %s%s",
                describe(metric, vm),
                reason,
                f"; stderr: {stderr}" if stderr else "",
            )
            return None
        if result.stderr:
            log.debug("%s wrote on stderr: %r", describe(metric, vm), result.stderr)
        if result.stdout_size > cap:
            log.debug(
                "%s: output of %d bytes cut to %d", describe(metric, vm), result.stdout_size, cap
            )
            return trim_partial_utf8(result.stdout)
        return result.stdout


Matcher = Callable[[MetricSpec], bool]


class SourceRegistry:
    """Which source serves a metric: the first matching route, else the default."""

    def __init__(
        self, default: MetricSource, routes: Sequence[Tuple[Matcher, MetricSource]] = ()
    ) -> None:
        self.default = default
        self.routes = tuple(routes)

    def source_for(self, metric: MetricSpec) -> MetricSource:
        """The source that produces METRIC's value."""
        for matches, source in self.routes:
            if matches(metric):
                return source
        return self.default
