"""The daemon's history: derived values each cycle, RRD files, published consolidations.

The daemon calls :meth:`History.observe` once per cycle with the cycle's
:class:`~vhostmd_py.sources.stats.CycleStats`. It computes the derived values at
once (pure, rates.py), then hands the file work of the cycle (creating files
of new VMs, one RRD update per file, the index, removing files of VMs gone for
longer than the retention) as ONE job to a worker thread, so publishing never
waits for the disk. At most ``max_pending`` jobs wait; when the disk cannot
keep up, a cycle's job is dropped (logged; the RRD shows a gap) instead of
piling up. All times come from the snapshots (``wall`` for the RRDs and the
retention, ``mono`` for rates): no clock is read here.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Tuple

from vhostmd_py.config import HistoryConfig
from vhostmd_py.cycle.snapshot import Snapshot
from vhostmd_py.history.consolidate import TrailingAverage
from vhostmd_py.history.errors import HistoryError
from vhostmd_py.history.index import Index, VmEntry, read_index, write_index
from vhostmd_py.history.publish import PublishedMetric, published_metrics
from vhostmd_py.history.rates import CounterBook, DerivedValues, HostRates, VmRates, derive
from vhostmd_py.history.rrd import HOST_SOURCES, VM_SOURCES, DataSource, RrdStore
from vhostmd_py.sources.stats import CycleStats

log = logging.getLogger(__name__)

# The index is rewritten when VMs come, go or are renamed, and at least this
# often (seconds) so "last seen" stays close to the truth after a kill -9.
INDEX_REFRESH = 300.0
# Windows of the published averages (seconds).
WINDOWS = (60.0, 300.0)



@dataclass(frozen=True)
class FileUpdate:
    """One RRD sample to write (creating the file first if needed)."""

    path: str
    sources: Tuple[DataSource, ...]
    values: Tuple[float | None, ...]


@dataclass(frozen=True)
class Job:
    """One cycle's file work, applied in order by the worker."""

    wall: float
    updates: Tuple[FileUpdate, ...]
    index: Index | None = None
    remove: Tuple[str, ...] = ()


@dataclass
class _Stats:
    jobs_done: int = 0
    jobs_dropped: int = 0
    errors: int = 0
    created: int = 0
    seconds: float = 0.0
    last_error: str | None = field(default=None)


def host_values(host: HostRates) -> Tuple[float | None, ...]:
    """The host file's values in HOST_SOURCES order."""
    return (host.cpu_pct, host.iowait_pct, host.steal_pct, host.load1, host.mem_used_pct)


def vm_values(vm: VmRates) -> Tuple[float | None, ...]:
    """A VM file's values in VM_SOURCES order."""
    return (
        vm.cpu_pct,
        vm.net_rx_bytes,
        vm.net_tx_bytes,
        vm.net_rx_packets,
        vm.net_tx_packets,
        vm.disk_rd_bytes,
        vm.disk_wr_bytes,
        vm.disk_rd_req,
        vm.disk_wr_req,
    )


class History:
    """Rates, RRD files and published consolidations of the host and every VM."""

    def __init__(
        self,
        config: HistoryConfig,
        *,
        update_period: int,
        threaded: bool = True,
        max_pending: int = 10,
    ) -> None:
        self.config = config
        self.update_period = update_period
        self.heartbeat = config.effective_heartbeat(update_period)
        self.store = RrdStore(
            config.state_dir, step=update_period, heartbeat=self.heartbeat, daemon=config.rrdcached
        )
        self.store.prepare()
        self._book = CounterBook.empty()
        self._last_mono: float | None = None
        self._averages: Dict[str, TrailingAverage] = {}
        try:
            loaded = read_index(config.state_dir)
        except HistoryError as err:
            log.warning("%s; starting a new index", err)
            loaded = Index()
        self._names: Dict[str, VmEntry] = dict(loaded.vms)
        self._present: frozenset[str] = frozenset()
        self._index_dirty = True
        self._index_written: float | None = None
        self._pending_removals: List[str] = []
        self.stats = _Stats()
        self._threaded = threaded
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.last_derived: DerivedValues | None = None

    # --- each cycle --------------------------------------------------------------

    def observe(self, snapshot: CycleStats) -> DerivedValues:
        """This cycle's derived values; queues the cycle's file work."""
        if self._closed:
            raise HistoryError(self.config.state_dir, "history already closed")
        derived, self._book = derive(self._book, snapshot, heartbeat=self.heartbeat)
        self._consolidate(derived)
        self._submit(self._job(derived))
        self.last_derived = derived
        return derived

    def _consolidate(self, derived: DerivedValues) -> None:
        dt = 0.0
        if self._last_mono is not None and 0 < derived.mono - self._last_mono <= self.heartbeat:
            dt = derived.mono - self._last_mono
        self._last_mono = derived.mono
        keep: Dict[str, TrailingAverage] = {}
        series = [("host", derived.host.cpu_pct)] + [(vm.uuid, vm.cpu_pct) for vm in derived.vms]
        for key, value in series:
            avg = self._averages.get(key) or TrailingAverage(max(WINDOWS))
            avg.add(derived.mono, dt, value)
            keep[key] = avg
        self._averages = keep

    def average(self, key: str, window: float) -> float | None:
        """The CPU % of "host" or a VM UUID averaged over the last WINDOW seconds."""
        avg = self._averages.get(key)
        if avg is None or self._last_mono is None:
            return None
        return avg.average(window, self._last_mono)

    def _job(self, derived: DerivedValues) -> Job:
        wall = derived.wall
        updates = [FileUpdate(self.store.host_path(), HOST_SOURCES, host_values(derived.host))]
        present = set()
        for vm in derived.vms:
            try:
                path = self.store.vm_path(vm.uuid)
            except HistoryError as err:
                log.warning("%s: not recorded", err)
                continue
            present.add(vm.uuid)
            entry = self._names.get(vm.uuid)
            if entry is None or entry.name != vm.name:
                self._index_dirty = True
            self._names[vm.uuid] = VmEntry(vm.name, wall)
            updates.append(FileUpdate(path, VM_SOURCES, vm_values(vm)))
        if present != self._present:
            self._index_dirty = True
            self._present = frozenset(present)
        for uuid, entry in list(self._names.items()):
            if uuid not in present and wall - entry.last_seen > self.config.retention:
                log.info(
                    "VM %s (%s) gone for longer than the retention: removing its history",
                    entry.name,
                    uuid,
                )
                del self._names[uuid]
                self._pending_removals.append(self.store.vm_path(uuid))
                self._index_dirty = True
        index = None
        if (
            self._index_dirty
            or self._index_written is None
            or wall - self._index_written >= INDEX_REFRESH
        ):
            index = Index(dict(self._names), self.update_period, self.config.rrdcached)
        return Job(wall, tuple(updates), index, tuple(self._pending_removals))

    def _submit(self, job: Job) -> None:
        if not self._threaded:
            self._accepted(job)
            self._apply(job)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="vhostmd-history", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.stats.jobs_dropped += 1
            log.warning(
                "history: the RRD writes are %d cycles behind: dropping this cycle's samples "
                "(%d dropped so far)",
                self._queue.maxsize,
                self.stats.jobs_dropped,
            )
            return
        self._accepted(job)

    def _accepted(self, job: Job) -> None:
        if job.index is not None:
            self._index_dirty = False
            self._index_written = job.wall
        self._pending_removals = [p for p in self._pending_removals if p not in job.remove]

    # --- the worker ----------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._apply(job)
            finally:
                self._queue.task_done()

    def _apply(self, job: Job) -> None:
        import time

        started = time.perf_counter()
        errors: List[str] = []
        created = 0
        for update in job.updates:
            try:
                if self.store.ensure(update.path, update.sources, job.wall):
                    created += 1
                self.store.update(update.path, job.wall, update.values)
            except HistoryError as err:
                errors.append(str(err))
        if created:
            self.stats.created += created
            try:
                self.store.sync_dirs()
            except HistoryError as err:
                errors.append(str(err))
        if job.index is not None:
            try:
                write_index(self.config.state_dir, job.index)
            except HistoryError as err:
                errors.append(str(err))
        for path in job.remove:
            try:
                self.store.forget(path)
            except HistoryError as err:
                errors.append(str(err))
        self.stats.jobs_done += 1
        self.stats.seconds += time.perf_counter() - started
        if errors:
            self.stats.errors += len(errors)
            self.stats.last_error = errors[-1]
            log.error(
                "history: %d RRD operations failed this cycle, e.g. %s", len(errors), errors[0]
            )

    def wait_idle(self) -> None:
        """Block until every queued job is written (tests, benchmarks, shutdown)."""
        if self._thread is not None:
            self._queue.join()

    # --- publishing ------------------------------------------------------------------

    def published(
        self, derived: DerivedValues
    ) -> Tuple[Sequence[PublishedMetric], Mapping[str, Sequence[PublishedMetric]]]:
        """The host's and each VM's (by UUID) published metrics for these values."""
        return published_metrics(derived, self.average)

    def decorate(self, snapshot: Snapshot, derived: DerivedValues) -> Snapshot:
        """The snapshot with the published metrics appended (unchanged unless publish=yes)."""
        if not self.config.publish:
            return snapshot
        from vhostmd_py.history.publish import decorate

        host, vms = self.published(derived)
        return decorate(snapshot, host, vms, derived)

    # --- the end -----------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to TIMEOUT seconds), flush rrdcached, stop the worker."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                log.warning("history: worker stuck, abandoning queued samples")
                return
            thread.join(timeout)
            if thread.is_alive():
                log.warning("history: RRD writes still running after %.0f s, abandoning", timeout)
                return
        self.store.flush()
        if self._names or self._index_written is not None:
            # "last seen" of the VMs running now is this moment, not the last refresh.
            try:
                write_index(
                    self.config.state_dir,
                    Index(dict(self._names), self.update_period, self.config.rrdcached),
                )
            except HistoryError as err:
                log.error("history: %s", err)
