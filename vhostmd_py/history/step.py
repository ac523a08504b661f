"""The history as a cycle step of the daemon (vhostmd_py.assemble.Step).

Each cycle it observes the cycle's statistics (rates, RRD rows: the History
does that work) and, with ``publish="yes"``, adds the published values
through render.append_metrics (vhostmd_py.history.publish.decorate). A cycle
whose statistics could not be read is a gap: nothing observed, nothing added.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from vhostmd_py.cycle.snapshot import Snapshot
from vhostmd_py.history.core import History
from vhostmd_py.history.rates import DerivedValues
from vhostmd_py.sources.stats import CycleStats

log = logging.getLogger(__name__)


class HistoryStep:
    """One History, fed once per cycle."""

    reads_stats = True

    def __init__(self, history: History) -> None:
        self.history = history
        self._derived: DerivedValues | None = None

    @classmethod
    def create(cls, config: Any) -> HistoryStep:
        """The history CONFIG's <history> asks for (HistoryError when impossible)."""
        step = cls(History(config.history, update_period=config.update_period))
        log.info("Recording history in %s", config.history.state_dir)
        return step

    async def observe(self, stats: CycleStats | None) -> None:
        """Feed the history with the cycle's statistics (None: a gap)."""
        self._derived = None
        if stats is None:
            return
        try:
            self._derived = self.history.observe(stats)
        except Exception:  # the history must never cost the metrics
            log.exception("history update failed")

    def decorate(self, snapshot: Snapshot) -> Snapshot:
        """SNAPSHOT with the published values of this cycle added."""
        derived, self._derived = self._derived, None
        if derived is None:
            return snapshot
        try:
            return self.history.decorate(snapshot, derived)
        except Exception:  # the history must never cost the metrics
            log.exception("history update failed")
        return snapshot

    def reconfigure(self, config: Any) -> bool:
        """Whether CONFIG's <history> and period are the ones in force (else: restarted)."""
        return bool(config.history == self.history.config
                    and config.update_period == self.history.update_period)

    async def close(self) -> None:
        """Write what is queued and stop (waits for the RRD writes: off the event loop)."""
        await asyncio.get_running_loop().run_in_executor(None, self.history.close)
