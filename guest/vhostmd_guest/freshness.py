"""Freshness and host identity of a metrics document (the names in vhostmd_wire.protocol).

A host that opts in publishes three host metrics: PublicationTime (real64,
seconds since the epoch, when the document was rendered), UpdatePeriod
(uint32 seconds) and HostIdentity (32 lowercase hex chars, a keyed hash
that changes with the host). Upstream daemons publish none of them.

Staleness, precisely: with P = UpdatePeriod and f = factor (default 2),
the document is stale when EITHER

1. its age -- the guest's wall clock minus PublicationTime -- exceeds f*P
   (needs PublicationTime and guest/host clocks in step), OR
2. the reader has seen the same document bytes, by its own monotonic
   clock, for more than f*P: from the first read that returned these
   bytes to now (robust to clock skew; it cannot report staleness
   earlier than the truth, since the bytes were published before the
   reader first saw them).

A host that publishes keeps changing the bytes (PublicationTime changes on
every publication), so (2) resets at every publication the reader sees.
Without UpdatePeriod nothing can be said: is_stale raises
FreshnessUnavailableError; age() needs PublicationTime likewise. The
identity is simply None when not published.
"""

import math
from typing import Callable, Optional, Union

from vhostmd_wire import protocol

from .document import MetricContext, MetricsDocument
from .errors import MetricNotFoundError, MetricValueError

__all__ = [
    "FreshnessUnavailableError",
    "StaleTracker",
    "document_age",
    "document_host_identity",
    "document_is_stale",
    "publication_time",
    "update_period",
]

Clock = Callable[[], float]


class FreshnessUnavailableError(MetricNotFoundError):
    """The host does not publish PublicationTime/UpdatePeriod (opt-in off, or upstream vhostmd)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, "host")
        self.reason = (
            f"no metric {name!r} in context host: the host does not publish freshness "
            "(vhostmd-py with freshness enabled does; upstream vhostmd does not)"
        )
        self.args = (self.reason,)


def _optional(doc: MetricsDocument, name: str) -> Optional[Union[int, float, str]]:
    try:
        return doc.get(name, MetricContext.HOST).value
    except MetricNotFoundError:
        return None


def publication_time(doc: MetricsDocument) -> Optional[float]:
    """PublicationTime in seconds since the epoch, or None when not published."""
    value = _optional(doc, protocol.FRESHNESS_TIME)
    if value is None:
        return None
    if isinstance(value, str) or not math.isfinite(value):
        raise MetricValueError(protocol.FRESHNESS_TIME, "real64", str(value), "not a finite time")
    return float(value)


def update_period(doc: MetricsDocument) -> Optional[int]:
    """UpdatePeriod in seconds, or None when not published."""
    value = _optional(doc, protocol.FRESHNESS_PERIOD)
    if value is None:
        return None
    if not isinstance(value, int) or value <= 0:
        raise MetricValueError(protocol.FRESHNESS_PERIOD, "uint32", str(value), "not a period > 0")
    return value


def document_host_identity(doc: MetricsDocument) -> Optional[str]:
    """HostIdentity (32 lowercase hex chars), or None when not published."""
    value = _optional(doc, protocol.HOST_IDENTITY)
    if value is None:
        return None
    text = str(value).strip()
    if not protocol.is_host_identity(text):
        raise MetricValueError(
            protocol.HOST_IDENTITY, "string", text, "not 32 lowercase hex characters"
        )
    return text


def document_age(doc: MetricsDocument, now: float) -> float:
    """now (guest wall clock, epoch s) minus PublicationTime; negative if the host is ahead."""
    published = publication_time(doc)
    if published is None:
        raise FreshnessUnavailableError(protocol.FRESHNESS_TIME)
    return now - published


def document_is_stale(
    doc: MetricsDocument, now: float, unchanged_for: float, factor: float = 2.0
) -> bool:
    """Rule 1 or rule 2 of the module docstring; unchanged_for from a StaleTracker."""
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be a finite number > 0, not {factor!r}")
    period = update_period(doc)
    if period is None:
        raise FreshnessUnavailableError(protocol.FRESHNESS_PERIOD)
    limit = factor * period
    if unchanged_for > limit:
        return True
    published = publication_time(doc)
    return published is not None and now - published > limit


class StaleTracker:
    """Since when (monotonic clock) the same document bytes have been seen."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._raw: Optional[bytes] = None
        self._since = 0.0

    def observe(self, raw: bytes) -> float:
        """Record a read of ``raw``; seconds the bytes have been unchanged (0 when new)."""
        now = self._clock()
        if raw != self._raw:
            self._raw = raw
            self._since = now
        return now - self._since

    def unchanged_for(self) -> float:
        """Seconds since the current bytes were first seen (0 before any read)."""
        if self._raw is None:
            return 0.0
        return self._clock() - self._since
