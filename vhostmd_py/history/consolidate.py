"""Trailing time-weighted averages of derived values, with RRD's xfiles factor.

The values published to guests ("the host's CPU over the last minute") are
consolidated in memory from the cycle's derived values, the way an RRD
AVERAGE archive consolidates primary data points: each value covers the
interval since the previous cycle, an average weighs values by the time they
cover, and it is unknown when less than ``1 - xff`` of the window is covered
by known values. After a daemon restart the windows fill again from empty.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Tuple

DEFAULT_XFF = 0.5


class TrailingAverage:
    """Time-weighted average of one value over trailing windows of up to ``longest`` s."""

    def __init__(self, longest: float, *, xff: float = DEFAULT_XFF) -> None:
        self.longest = longest
        self.xff = xff
        # (end, covered seconds, value) of known intervals, oldest first.
        self._items: Deque[Tuple[float, float, float]] = deque()

    def add(self, end: float, dt: float, value: float | None) -> None:
        """The value over (end - dt, end]; None records nothing (an unknown interval)."""
        if value is not None and dt > 0:
            self._items.append((end, dt, value))
        while self._items and self._items[0][0] <= end - self.longest:
            self._items.popleft()

    def average(self, window: float, now: float) -> float | None:
        """The average over (now - window, now], or None when too little is known."""
        start = now - window
        covered = 0.0
        weighted = 0.0
        for end, dt, value in self._items:
            if end <= start:
                continue
            part = min(dt, end - start)
            covered += part
            weighted += part * value
        if covered <= 0 or covered < (1.0 - self.xff) * window:
            return None
        return weighted / covered
