"""The daemon's own health: what it did, counted as it happens (no prometheus_client here).

The daemon records into one Health for its whole life (across reloads); the
OpenMetrics endpoint (vhostmd_py.publish.endpoint) reads a consistent copy
(:meth:`Health.read`) from its HTTP thread, so a lock guards every field.
Recording costs a lock and a few additions per cycle or per action batch.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, List, Sequence, Tuple

if TYPE_CHECKING:
    from vhostmd_py.sources.shell.runner import ActionResult

# Upper bounds (seconds) of the cycle duration histogram's buckets: a native
# cycle takes milliseconds, 1000 VMs of shell actions several seconds, and
# upstream itself minutes (bench/README.md).
CYCLE_BUCKETS: Tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)


@dataclass(frozen=True)
class HealthReading:
    """A consistent copy of the counters, taken at one instant."""

    cycles: int
    cycle_bucket_counts: Tuple[int, ...]  # per bucket of CYCLE_BUCKETS, then +Inf (not cumulative)
    cycle_seconds_sum: float
    actions: int
    action_failures: int
    action_timeouts: int
    publish_errors: int
    vms: int
    carried_values: int  # metric values published from an earlier cycle (still being read)
    carried_now: int  # of them, in the last cycle
    last_publish: float | None  # wall-clock seconds of the last successful publish


@dataclass
class Health:
    """Counters of the daemon's life, recorded by the daemon's loop."""

    buckets: Tuple[float, ...] = CYCLE_BUCKETS
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _counts: List[int] = field(default_factory=list)
    _sum: float = 0.0
    _actions: int = 0
    _failures: int = 0
    _timeouts: int = 0
    _publish_errors: int = 0
    _vms: int = 0
    _carried: int = 0
    _carried_now: int = 0
    _last_publish: float | None = None

    def __post_init__(self) -> None:
        self._counts = [0] * (len(self.buckets) + 1)

    def record_cycle(self, seconds: float, vms: int) -> None:
        """A finished cycle: how long it took and how many VMs it saw."""
        # A value equal to a bound belongs to that bucket (le: less or equal).
        place = bisect.bisect_left(self.buckets, seconds)
        with self._lock:
            self._counts[place] += 1
            self._sum += seconds
            self._vms = vms

    def record_actions(self, results: Sequence[ActionResult]) -> None:
        """One batch of action results (ActionRunner.on_results).

        Counted: every action started (a shell that could not be spawned did
        not start one); as failures, every one whose value cannot be used
        (timeouts, too much output, non-zero status, signals, spawn errors),
        except those cancelled because the daemon is stopping.
        """
        run = failed = timed_out = 0
        for result in results:
            if result.cancelled:
                continue
            if result.spawn_error is None:
                run += 1
            if result.failure() is not None:
                failed += 1
            if result.timed_out:
                timed_out += 1
        with self._lock:
            self._actions += run
            self._failures += failed
            self._timeouts += timed_out

    def record_carried(self, count: int) -> None:
        """A cycle published COUNT values carried from earlier cycles (vhostmd_py.cycle.carry)."""
        with self._lock:
            self._carried += count
            self._carried_now = count

    def record_publish(self, ok: bool, when: float) -> None:
        """A publish (disk or virtio update) at wall-clock WHEN; OK False counts an error."""
        with self._lock:
            if ok:
                self._last_publish = when
            else:
                self._publish_errors += 1

    def read(self) -> HealthReading:
        """A consistent copy of every counter."""
        with self._lock:
            return HealthReading(
                cycles=sum(self._counts),
                cycle_bucket_counts=tuple(self._counts),
                cycle_seconds_sum=self._sum,
                actions=self._actions,
                action_failures=self._failures,
                action_timeouts=self._timeouts,
                publish_errors=self._publish_errors,
                vms=self._vms,
                carried_values=self._carried,
                carried_now=self._carried_now,
                last_publish=self._last_publish,
            )
