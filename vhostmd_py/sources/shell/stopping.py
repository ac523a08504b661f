"""Ending actions early: cancelled jobs killed and waited for, abandoned shells reaped.

The runner (vhostmd_py.sources.shell.runner) starts batches; this is what
it does when a cycle is cancelled (the daemon stopping) and with the worker
shells C gave up on after the kill grace (they must not stay zombies).
Killing itself (the abort pipe, killpg of a job's worker) is the batch's,
vhostmd_py.sources.shell.batch.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Dict, Iterable, Sequence, Set

from vhostmd_py.sources.shell.batch import ActionJob, Batch

# A cancelled run() waits at most this long for its child to be killed and
# reaped (the daemon allows a cancelled cycle 1.2 s: daemon.CANCEL_GRACE).
CANCEL_WAIT = 1.0
# ... of which at most this long blocking the loop, for all the actions one
# cancellation burst ends together (the stop path only).
CANCEL_SPIN = 0.05


class Stopper:
    """The runner's cancellation budget and its abandoned worker shells."""

    def __init__(self) -> None:
        self._unreaped: Set[int] = set()
        self._spin_until = 0.0

    async def cancel(self, jobs: Sequence[ActionJob]) -> None:
        """Kill JOBS (the daemon is stopping): none of their children outlives this call.

        asyncio.gather() ends at the FIRST cancelled child, so what must be
        true when the cycle's cancellation completes is done here
        synchronously: abort, kill now and wait briefly for C to reap (a
        killed shell is gone in well under a millisecond); only a child
        stuck past that is waited for without blocking the loop (polling:
        this is the stop path only).
        """
        for job in jobs:
            if job.batch is None and not job.future.done():
                job.future.cancel()  # not flushed yet: the flush skips it
        started = [j for j in jobs if j.batch is not None]
        mine: Dict[Batch, int] = {}
        for job in started:
            assert job.batch is not None
            mine[job.batch] = mine.get(job.batch, 0) + 1
        for batch, count in mine.items():
            if count == len(batch.jobs):
                batch.abort(None)  # one write for the whole batch
            else:
                for job in started:
                    if job.batch is batch:
                        batch.abort(job.index)
        now = time.monotonic()
        if now >= self._spin_until:
            # One budget per burst: a stopping cycle cancels every action in
            # the same loop iteration.
            self._spin_until = now + CANCEL_SPIN
        for job in started:
            assert job.batch is not None
            job.batch.kill_now(job.index, self._spin_until)
        deadline = time.monotonic() + CANCEL_WAIT
        for job in started:
            assert job.batch is not None
            while not job.batch.ended(job.index) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)

    def abandoned(self, pids: Iterable[int]) -> None:
        """Shells C gave up on after the kill grace: reap them later (reap())."""
        self._unreaped.update(pids)

    def reap(self) -> None:
        """Reap the abandoned shells that have ended by now."""
        for pid in list(self._unreaped):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._unreaped.discard(pid)

    def reap_all(self, within: float) -> None:
        """Reap the abandoned shells, waiting up to WITHIN seconds for them (blocking)."""
        deadline = time.monotonic() + within
        while self._unreaped and time.monotonic() < deadline:
            self.reap()
            if self._unreaped:
                time.sleep(0.01)
