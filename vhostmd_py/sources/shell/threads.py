"""The threads that run the action batches, and the hand-back of their results to the loop.

Each batch (vhostmd_py.sources.shell.batch) runs in C in a thread of its
own with the GIL released; its results come back to the event loop in one
call per batch, which resolves the futures of its jobs that are not done yet
(the runner's collect_ready() may have resolved some earlier).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from typing import Callable, List, Sequence, Set

from vhostmd_py.sources.shell.batch import ActionResult, Batch


class BatchThreads:
    """Up to SIZE threads running EXECUTE(batch); DELIVERED(results) once per batch that ran."""

    def __init__(
        self,
        size: int,
        execute: Callable[[Batch], List[ActionResult]],
        delivered: Callable[[Sequence[ActionResult]], None],
    ) -> None:
        self._size = size
        self._execute = execute
        self._delivered = delivered
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.batches: Set[Batch] = set()  # submitted, results not yet delivered

    def submit(self, loop: asyncio.AbstractEventLoop, batch: Batch) -> None:
        """Run BATCH in a thread; its jobs' futures are resolved on LOOP."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self._size, thread_name_prefix="vhostmd-actions"
            )
        self.batches.add(batch)
        try:
            done = self._pool.submit(self._execute, batch)
        except BaseException:
            self.batches.discard(batch)
            batch.close()
            raise

        def deliver(fut: concurrent.futures.Future[List[ActionResult]]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(self._deliver, batch, fut)

        done.add_done_callback(deliver)

    def _deliver(self, batch: Batch, fut: concurrent.futures.Future[List[ActionResult]]) -> None:
        self.batches.discard(batch)
        error = fut.exception()
        if error is None:
            self._delivered(fut.result())
        # batch.jobs <-> job.batch is a reference cycle: left to the cyclic
        # collector, a cycle's batches (their C buffers, jobs and futures)
        # lived on into the next cycles and raised the daemon's peak memory.
        jobs, batch.jobs = batch.jobs, []
        for index, job in enumerate(jobs):
            if job.future.done():
                continue
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(fut.result()[index])

    def shutdown(self) -> None:
        """Wait for the running batches' threads to end (blocking); forget the batches."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.batches.clear()
