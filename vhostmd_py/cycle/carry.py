"""Complete documents on time: a metric still being read at the deadline keeps its last value.

A cycle publishes at its deadline (docs/DESIGN.md, Concurrency). A metric
whose action (or built-in read) has not finished by then is published with
its last good value instead of being left out, so every document holds every
metric that has had a value for a running VM, and a guest agent reading a
few named metrics never sees them flicker in and out. The fresh value
replaces the carried one in the first document after it arrives.

A value is carried for at most ``bound`` seconds after it was read: the
action timeout (``--action-timeout``, 30 s by default), by which a shell
action still running is killed; a built-in read that hangs is bounded the
same. Past that, or when the late read fails, the carried value is
dropped, logged once, and left out until a fresh value arrives. A metric
that failed (non-zero exit, garbage, a value that does not fit its type)
is left out and its carried value forgotten: only lateness is bridged,
never a failure.

With ``<freshness/>`` (``annotate``) a carried element says how old its
value is, as an ``age`` attribute in seconds, which upstream's reader and
its DTD-less parse ignore; documents of upstream-only configs are
unchanged. An ``xml`` metric's element is the action's own and is carried
as it is.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from vhostmd_py.config import MetricSpec
from vhostmd_py.sources.base import PENDING, RawValue, describe
from vhostmd_py.sources.vm import VM

log = logging.getLogger(__name__)

# Whose value: (metric name, context, VM uuid or None for the host).
CarryKey = Tuple[str, str, Optional[str]]

_OPEN_TAG = re.compile(rb"<metric(?=[\s>])")


@dataclass
class _Kept:
    xml: bytes  # the rendered element(s), as published when the value was fresh
    read_at: float  # wall-clock seconds when the value was read
    describe: str


def _key(metric: MetricSpec, vm: VM | None) -> CarryKey:
    return (metric.name, metric.context, None if vm is None else vm.uuid)


def annotate(xml: bytes, age: float) -> bytes:
    """XML's ``<metric>`` elements with ``age='SECONDS'`` (whole seconds, rounded)."""
    tag = b"<metric age='%d'" % max(0, round(age))
    return _OPEN_TAG.sub(tag, xml)


class Carry:
    """The last good element of every (metric, VM), kept across cycles by the daemon."""

    def __init__(
        self,
        *,
        bound: float,
        annotate: bool = False,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if bound <= 0:
            raise ValueError("bound must be positive")
        self.bound = bound
        self.annotate = annotate
        self._wall = wall
        self._kept: Dict[CarryKey, _Kept] = {}
        self._expired: Set[CarryKey] = set()  # dropped past the bound, logged once
        self._carrying: Set[CarryKey] = set()  # carried by the last cycle
        self.carried_last = 0  # how many values the last cycle carried

    def settle(
        self,
        requests: Sequence[Tuple[MetricSpec, VM | None]],
        raws: Sequence[RawValue],
        rendered: Sequence[bytes],
    ) -> List[bytes]:
        """This cycle's elements: RENDERED, with carried values where a value was PENDING.

        Also remembers every fresh element, forgets those that failed, and
        forgets every (metric, VM) this cycle did not ask for (a VM gone, a
        metric removed by a reload).
        """
        now = self._wall()
        out: List[bytes] = []
        asked: Set[CarryKey] = set()
        now_carrying: Set[CarryKey] = set()
        carried = 0
        for (metric, vm), raw, xml in zip(requests, raws, rendered):
            key = _key(metric, vm)
            asked.add(key)
            if raw is not PENDING:
                if xml:
                    self._kept[key] = _Kept(xml, now, describe(metric, vm))
                    if key in self._expired:
                        self._expired.discard(key)
                        log.info("%s: a fresh value again", describe(metric, vm))
                else:
                    kept = self._kept.pop(key, None)  # failed or left out: nothing to carry
                    if kept is not None and key in self._carrying:
                        self._expired.add(key)
                        log.warning("%s: its value of %.0f s ago is no longer published: "
                                    "the late read failed", kept.describe, now - kept.read_at)
                out.append(xml)
                continue
            kept = self._kept.get(key)
            if kept is None:
                out.append(b"")
                continue
            age = now - kept.read_at
            if age > self.bound:
                del self._kept[key]
                self._expired.add(key)
                log.warning(
                    "%s: its value of %.0f s ago is no longer published (carried at most "
                    "%.0f s, the action timeout); left out until the source answers",
                    kept.describe, age, self.bound,
                )
                out.append(b"")
                continue
            carried += 1
            now_carrying.add(key)
            out.append(annotate(kept.xml, age) if self.annotate and metric.type != "xml"
                       else kept.xml)
        for key in set(self._kept) - asked:
            del self._kept[key]
        self._expired &= asked
        self._carrying = now_carrying
        self.carried_last = carried
        return out
