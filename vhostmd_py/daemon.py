"""The metrics loop: fixed-rate cycles, publishing, stop and reload requests.

One asyncio loop runs everything (docs/DESIGN.md). The process around it
(start-up order, daemonizing, pid file, which signals do what) is
vhostmd_py.process.life's. Blocking libvirt calls go
to one worker thread; actions run in the runner's C batch spawner
(csrc/runner.c) on worker threads with the GIL released; the vbd publish
is a few pwrite() calls done inline, so a signal can never interleave with
it and the disk is never left half written.

Upstream differences (SPEC section 7, FACTS section 5), all deliberate:
- upstream never sleeps with update_period 1 and sleeps whole seconds
  otherwise; we start cycle k at t0 + k * period on a monotonic clock, and a
  cycle that overruns is followed at once by the next one, re-anchoring the
  schedule (no backlog, no burst of catch-up cycles);
- upstream finishes the whole cycle after SIGTERM (525 s with 1000 VMs); we
  cancel it, the runner kills the running actions, and we exit at once;
- upstream has no SIGHUP handling; we reload the configuration and keep the
  old one when the new one is invalid;
- upstream's cycle waits for its slowest action, for ever if one hangs; ours
  has a deadline (cycle start + period - margin, margin = 20 % of the period,
  at most 2 s; never less than MIN_ACTION_WINDOW after the VM listing) and
  publishes what is ready then; an action still running goes on under its
  timeout and is not started again while it runs (ShellActionSource);
- upstream leaves what actions start in the background to init; we are the
  subreaper of our actions' orphans and bound and end them
  (vhostmd_py.sources.shell.orphans).

What a reload applies: metrics, actions' PATH, update_period, transports, the
disk (re-created when its path or size changed; the old one is closed with
busy clear) and the virtio settings (the transport is restarted). What it
cannot change: the command line (-c URI, -u USER, --jobs, --action-timeout),
and after -u USER a new disk the unprivileged user may not create (then the
whole new config is refused, logged, and the old one stays in force).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, List, Tuple, TypeVar

from vhostmd_py.cycle import render
from vhostmd_py.cycle.snapshot import VM, Snapshot
from vhostmd_py.errors import ContentTooLargeError, VhostmdError
from vhostmd_py.logsetup import LIFECYCLE
from vhostmd_py.process.life import install_loop_signals
from vhostmd_py.publish.health import Health

if TYPE_CHECKING:
    from vhostmd_py.config import Config
    from vhostmd_py.cycle.freshness import Freshness
    from vhostmd_py.cycle.stats import CycleStats
    from vhostmd_py.history.core import History
    from vhostmd_py.monitors.step import Monitor
    from vhostmd_py.publish.endpoint import MetricsEndpoint
    from vhostmd_py.publish.mdisk import MetricsDisk
    from vhostmd_py.publish.pervm import PerVmDisks
    from vhostmd_py.publish.virtio.server import VirtioServer
    from vhostmd_py.sources.base import ShellActionSource, SourceRegistry
    from vhostmd_py.sources.builtin.source import NativeSource
    from vhostmd_py.sources.shell.orphans import OrphanReaper
    from vhostmd_py.sources.shell.runner import ActionRunner
    from vhostmd_py.sources.vms import LibvirtVMs

log = logging.getLogger(__name__)

T = TypeVar("T")

# A libvirtd that accepts connections but never answers blocks libvirt-python
# calls forever (no keepalive without a libvirt event loop). Past this many
# seconds the cycle goes on without VMs, so host metrics are still published.
LIBVIRT_TIMEOUT = 5.0
# How long a cancelled cycle may take to wind down (children killed) before we
# stop waiting for it: the whole stop must fit in 2 seconds (SPEC section 7).
CANCEL_GRACE = 1.2
# The cycle's deadline: its start + period - margin; the margin (this share of
# the period, at most MAX_MARGIN s) is for rendering and publishing, so each
# cycle publishes before the next one is due even when an action hangs.
DEADLINE_MARGIN = 0.2
MAX_MARGIN = 2.0
# Actions always get at least this long after the VM listing (a slow libvirt
# may already have used the cycle's budget: publish late rather than empty).
MIN_ACTION_WINDOW = 0.2


class BlockingWorker:
    """One daemon thread running blocking calls (libvirt) for the event loop.

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so a
    libvirt call stuck on a dead remote libvirtd would delay our exit past the
    2-second stop promise. A daemon thread is simply abandoned.
    """

    def __init__(self, name: str = "vhostmd-libvirt") -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._started = False

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the worker thread and await its result."""
        if not self._started:
            self._thread.start()
            self._started = True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, args, loop, future))
        return await future

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args, loop, future = item
            try:
                result, error = fn(*args), None
            except BaseException as err:
                result, error = None, err
            # RuntimeError: the loop is closed, nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, future, result, error)

    def shutdown(self) -> None:
        """Let the thread end after the calls already queued."""
        self._queue.put(None)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _needs_vms(config: Config) -> bool:
    from vhostmd_py.sources.builtin.catalogue import needs_libvirt

    return (
        "virtio" in config.transports
        or any(m.context == "vm" for m in config.metrics)
        # One disk per running VM needs the running VMs.
        or config.disk_per_vm is not None
        # Built-in host fields read from libvirt (node info) need its connection.
        or needs_libvirt([m.source for m in config.metrics if m.source is not None])
        # The history, alarms and accounting read every VM's counters.
        or config.history is not None
        or config.alarms is not None
        or config.accounting is not None
    )


class Daemon:
    """The metrics daemon: one Config, one libvirt URI, cycles until stopped.

    Every OS boundary is injected: the config loader (reload), the disk
    factory, the VM source factory, the action runner factory and the clock.
    """

    def __init__(
        self,
        config: Config,
        *,
        uri: str | None,
        runner_factory: Callable[[Config], ActionRunner],
        config_loader: Callable[[str], Config] | None = None,
        vms_factory: Callable[[str | None, bool], LibvirtVMs] | None = None,
        disk_factory: Callable[[str, int], MetricsDisk] | None = None,
        clock: Callable[[], float] = time.monotonic,
        publish: bool = True,
        use_virtio: bool = True,
        libvirt_timeout: float = LIBVIRT_TIMEOUT,
        stats_source: Callable[[List[VM]], CycleStats] | None = None,
        monitor_factory: Callable[[Config], Monitor] | None = None,
        reap_orphans: bool = False,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.uri = uri
        self._runner_factory = runner_factory
        self._config_loader = config_loader
        self._vms_factory = vms_factory
        self._disk_factory = disk_factory
        self._clock = clock
        self._publish_enabled = publish
        self._use_virtio = use_virtio
        self._libvirt_timeout = libvirt_timeout
        self._pending_list: asyncio.Future[List[VM]] | None = None
        self._libvirt_stuck = False
        # The daemon's own health, for the OpenMetrics endpoint (issue 15):
        # recorded whether or not an endpoint serves it (a few additions a cycle).
        self.health = Health()
        self._endpoint: MetricsEndpoint | None = None
        self._runner = self._make_runner(config)
        self._source: ShellActionSource | None = None  # made with the runner, on first use
        self._reap_orphans = reap_orphans
        self._orphans: OrphanReaper | None = None
        self._deadlines = True
        self._vms: LibvirtVMs | None = None
        self._disk: MetricsDisk | None = None
        # vhostmd-py extension (issue 15): per-VM disks and freshness metrics,
        # set up by open_disk() (before -u drops root) or on the first cycle.
        self._wall = wall
        self._pervm: PerVmDisks | None = None
        self._freshness: Freshness | None = None
        self._extensions_ready = False
        self._listed_ok = True  # whether the last VM listing was libvirt's answer
        self._virtio: VirtioServer | None = None
        self._worker = BlockingWorker()
        self._native: NativeSource | None = None  # built-in metrics, created on first use
        # The history (config <history>): fed each cycle from stats_source, a
        # blocking call run on the worker thread that returns the cycle's raw
        # statistics (the built-in sources). Without a source it stays off.
        self._stats_source = stats_source
        self._history: History | None = None
        self._stop: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._reload_requested = False
        self._restore_signals: Callable[[], None] | None = None
        self.cycles = 0
        self.last_snapshot: Snapshot | None = None
        # Whether the last vbd publish succeeded (None: none attempted yet);
        # --once turns a failure into a non-zero exit status.
        self.last_publish_ok: bool | None = None
        self._published_any = False
        self._announced = False  # ops: the first-publish line was logged
        # --- alarms and accounting (issue 14): fed each cycle with the raw
        # statistics (_cycle_stats), like the history.
        self._monitor_factory = monitor_factory
        self.monitor: Monitor | None = None
        self._update_monitor(config)

    def _update_monitor(self, config: Config) -> None:
        from vhostmd_py.monitors.step import Monitor, wanted

        if not wanted(config):
            if self.monitor is not None:
                self.monitor.close()
            self.monitor = None
        elif self.monitor is not None:
            self.monitor.reconfigure(config)
        elif self._monitor_factory is not None:
            self.monitor = self._monitor_factory(config)
        else:
            self.monitor = Monitor(config, uri=self.uri)

    async def _monitor_cycle(self, stats: CycleStats | None, snapshot: Snapshot) -> Snapshot:
        """Feed the alarms and the accounting; add their guest metrics."""
        assert self.monitor is not None
        if stats is not None:
            try:
                # On the libvirt worker: observing can cap or restore a VM's rate.
                await self._worker.call(self.monitor.observe, stats)
            except VhostmdError as err:
                log.error("alarms/accounting: %s", err)
        return self.monitor.decorate(snapshot)

    def _make_runner(self, config: Config) -> ActionRunner:
        runner = self._runner_factory(config)
        runner.on_results = self.health.record_actions
        return runner

    # --- start-up (synchronous, before privileges are dropped) ---------------

    def set_config_loader(self, loader: Callable[[str], Config]) -> None:
        """Reload with LOADER from now on (process.run: one that works after -u USER)."""
        self._config_loader = loader

    def open_disk(self) -> None:
        """Create the metrics disk when vbd is configured (raises DiskError).

        Also the per-VM disks' directory and the host identity (their files
        may need root, which -u USER gives up right after this).
        """
        if self._publish_enabled and "vbd" in self.config.transports:
            self._disk = self._create_disk(self.config)
        self._pervm, self._freshness = self._make_extensions(self.config)
        self._extensions_ready = True

    def _make_extensions(self, config: Config) -> Tuple[PerVmDisks | None, Freshness | None]:
        """The per-VM disks and the freshness metrics CONFIG asks for (raises VhostmdError)."""
        pervm = freshness = None
        if config.freshness is not None:
            from vhostmd_py.cycle.freshness import Freshness

            freshness = Freshness(config.freshness, config.update_period, wall=self._wall)
        if config.disk_per_vm is not None and self._publish_enabled:
            from vhostmd_py.publish.pervm import PerVmDisks

            pervm = PerVmDisks(config.disk_per_vm, max_disks=config.virtio.max_channels,
                               clock=self._clock, disk_factory=self._disk_factory)
            pervm.open()
            log.info("Using per-VM metrics disks %s (%d bytes each)", config.disk_per_vm.path,
                     config.disk_per_vm.size)
        return pervm, freshness

    def open_endpoint(self) -> None:
        """Bind the OpenMetrics endpoint when <metrics_endpoint> asks for one (EndpointError)."""
        endpoint_config = self.config.metrics_endpoint
        if endpoint_config is None or self._endpoint is not None:
            return
        from vhostmd_py.publish.endpoint import MetricsEndpoint

        endpoint = MetricsEndpoint.for_config(endpoint_config, self)
        endpoint.start()
        self._endpoint = endpoint

    @property
    def endpoint(self) -> MetricsEndpoint | None:
        """The OpenMetrics endpoint serving this daemon, when one was opened."""
        return self._endpoint

    def close_endpoint(self) -> None:
        """Stop the OpenMetrics endpoint (idempotent)."""
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            endpoint.close()

    @property
    def virtio_connections(self) -> int:
        """virtio channels connected now (0 without the virtio transport)."""
        server = self._virtio
        return server.connections if server is not None else 0

    def _create_disk(self, config: Config) -> MetricsDisk:
        factory = self._disk_factory
        if factory is None:
            from vhostmd_py.publish.mdisk import MetricsDisk

            factory = MetricsDisk.create
        # (config.py already warns about a disk too small for upstream's reader.)
        disk = factory(config.disk_path, config.disk_size)
        log.info("Using metrics disk path %s", config.disk_path)
        log.info("Using metrics disk size %d", config.disk_size)
        return disk

    def _make_vms(self, config: Config) -> LibvirtVMs:
        factory = self._vms_factory
        if factory is None:
            from vhostmd_py.sources.vms import LibvirtVMs

            def factory(uri: str | None, want_channels: bool) -> LibvirtVMs:
                return LibvirtVMs(uri, want_channels=want_channels)

        return factory(self.uri, self._virtio_wanted(config))

    def _virtio_wanted(self, config: Config) -> bool:
        return self._use_virtio and self._publish_enabled and "virtio" in config.transports

    # --- signals ---------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop as soon as possible (process.STOP_SIGNALS)."""
        if self._stop is not None and not self._stop.is_set():
            log.info("Stopping")
            self._stop.set()
            if self._wake is not None:
                self._wake.set()

    def request_reload(self) -> None:
        """Reload the configuration before the next cycle (SIGHUP)."""
        log.info("Reload requested")
        self._reload_requested = True
        if self._wake is not None:
            self._wake.set()

    # --- the loop ----------------------------------------------------------------

    async def run(
        self,
        *,
        max_cycles: int | None = None,
        signals: bool = True,
        deadlines: bool | None = None,
    ) -> None:
        """Run cycles until stopped (or MAX_CYCLES cycles), then release everything.

        DEADLINES (default: only without MAX_CYCLES, i.e. not for --once and
        --dump, which want every value once): publish each cycle by its
        deadline with the values that are ready.
        """
        loop = asyncio.get_running_loop()
        self._deadlines = max_cycles is None if deadlines is None else deadlines
        if self._reap_orphans and self._orphans is None:
            from vhostmd_py.sources.shell.orphans import OrphanReaper, enable_subreaper

            if enable_subreaper():
                self._orphans = OrphanReaper(max_age=self._runner.timeout)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        if signals:
            self._restore_signals = install_loop_signals(
                loop, self.request_stop, self.request_reload
            )
        try:
            if _needs_vms(self.config):
                self._vms = self._make_vms(self.config)
            if not self._extensions_ready:
                self._pervm, self._freshness = self._make_extensions(self.config)
                self._extensions_ready = True
            await self._start_virtio(self.config)
            self._start_history(self.config)
            await self._loop(max_cycles)
        finally:
            # Handlers stay until the shutdown is done: removing them first
            # would restore SIG_DFL, and a second SIGTERM during the shutdown
            # would kill us before the disk is closed (busy could stay set).
            try:
                await self._shutdown()
            finally:
                restore, self._restore_signals = self._restore_signals, None
                if restore is not None:
                    restore()

    async def _loop(self, max_cycles: int | None) -> None:
        assert self._stop is not None and self._wake is not None
        next_start = self._clock()
        while not self._stop.is_set():
            if self._reload_requested:
                await self._reload()
                next_start = self._clock()
            started = self._clock()
            period = self.config.update_period
            due = started + period - min(MAX_MARGIN, DEADLINE_MARGIN * period)
            if not await self._run_cycle(due if self._deadlines else None):
                return  # stopped while the cycle ran
            self._sweep_orphans()
            self.cycles += 1
            took = self._clock() - started
            snapshot = self.last_snapshot
            self.health.record_cycle(took, len(snapshot.vms) if snapshot is not None else 0)
            self._log_cycle(took)  # ops: -v line per cycle
            if max_cycles is not None and self.cycles >= max_cycles:
                return
            next_start += self.config.update_period
            now = self._clock()
            if next_start <= now:
                # Overran: start the next cycle now and re-anchor the schedule,
                # so a slow cycle never causes a burst of catch-up cycles.
                log.debug("cycle overran its period by %.3f s", now - next_start)
                next_start = now
                continue
            self._wake.clear()
            if self._reload_requested:
                continue  # SIGHUP arrived during the cycle: apply it now, not a period later
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), next_start - now)

    def _sweep_orphans(self) -> None:
        if self._orphans is None:
            return
        try:
            self._orphans.sweep(self._runner.worker_pids())
        except OSError as err:  # /proc unreadable: metrics matter more
            log.debug("sweeping actions' orphans: %s", err)

    async def _run_cycle(self, due: float | None = None) -> bool:
        """One cycle (publishing by DUE, on self._clock), cancelled by a stop request;
        False when stopped."""
        assert self._stop is not None
        cycle = asyncio.ensure_future(self._cycle(due))
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({cycle, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not cycle.done():
            cycle.cancel()
            # The runner kills running actions on cancellation; bound the wait
            # anyway so a child that ignores SIGKILL's reaping cannot hold us.
            await asyncio.wait({cycle}, timeout=CANCEL_GRACE)
            if not cycle.done():
                log.warning("Cycle did not end %.1f s after cancellation", CANCEL_GRACE)
            return False
        error = cycle.exception()
        if error is not None:
            # A bug or an OS failure in one cycle must not stop metrics for good.
            log.error("Metrics update failed: %s", error, exc_info=error)
        return True

    async def _cycle(self, due: float | None = None) -> None:
        from vhostmd_py.cycle.collect import collect

        config = self.config
        vms: List[VM] = []
        if self._vms is not None and _needs_vms(config):
            vms = await self._list_vms(self._vms)
        deadline = None
        if due is not None:
            # self._clock may be a test's; the sources wait on time.monotonic().
            deadline = time.monotonic() + max(due - self._clock(), MIN_ACTION_WINDOW)
        if self._stats_source is None and (self._history is not None or self.monitor is not None):
            from vhostmd_py.sources.builtin.catalogue import COUNTER_FIELDS

            # Sampled in the same libvirt call as the built-in metrics.
            self._native_source().extra_fields = COUNTER_FIELDS
        native = self._native
        sampled = native.last_snapshot if native is not None else None
        snapshot = await collect(
            config, vms, self._runner, sources=self._sources(config), deadline=deadline
        )
        if self._history is not None or self.monitor is not None:
            stats = await self._cycle_stats(vms, sampled, deadline)
            if self._history is not None and stats is not None:
                snapshot = self._observe_history(self._history, snapshot, stats)
            if self.monitor is not None:
                snapshot = await self._monitor_cycle(stats, snapshot)
        if self._freshness is not None:
            # Rendered now, into the host part every transport publishes.
            snapshot = replace(snapshot, host=snapshot.host + self._freshness.render())
        self.last_snapshot = snapshot
        if not self._publish_enabled:
            return
        if self._disk is not None:
            self._publish(self._disk, snapshot)
        if self._pervm is not None:
            self._pervm.publish(snapshot, listed=self._listed_ok)
        if self._virtio is not None:
            self._virtio.update(snapshot)
            if self._disk is None:
                self.health.record_publish(True, self._wall())
        self._log_first_publish(snapshot)  # ops: shown at the default level

    # --- ops: what an operator sees (logsetup.LIFECYCLE, -v) ------------------

    def _log_first_publish(self, snapshot: Snapshot) -> None:
        """Once per daemon life: the first cycle whose metrics reached a transport."""
        if self._announced or (self._disk is not None and not self.last_publish_ok):
            return
        if self._disk is None and self._virtio is None:
            return
        self._announced = True
        where = [f"disk {self._disk.path}"] if self._disk is not None else []
        if self._virtio is not None:
            where.append("virtio")
        metrics, vms = _counts(snapshot)
        logging.getLogger(LIFECYCLE).info(
            "first metrics published on %s: %d metrics, %d VMs", " and ".join(where), metrics, vms
        )

    def _log_cycle(self, took: float) -> None:
        """-v: one line per cycle (what was published, how long it took)."""
        if not log.isEnabledFor(logging.INFO):
            return
        metrics, vms = _counts(self.last_snapshot) if self.last_snapshot else (0, 0)
        log.info("cycle %d: %d metrics, %d VMs, %.3f s", self.cycles, metrics, vms, took)

    def _sources(self, config: Config) -> SourceRegistry:
        """Shell actions, and the built-in source when CONFIG names one; both kept across cycles."""
        from vhostmd_py.sources.base import ShellActionSource, SourceRegistry

        if self._source is None or self._source.runner is not self._runner:
            # One source across cycles: it knows which actions still run.
            self._source = ShellActionSource(self._runner, path=config.path)
        if not any(m.source is not None for m in config.metrics):
            return SourceRegistry(self._source)
        from vhostmd_py.sources.builtin.source import is_builtin

        return SourceRegistry(self._source, [(is_builtin, self._native_source())])

    def _native_source(self) -> NativeSource:
        """The built-in source, created on first use and kept across cycles."""
        if self._native is None:
            from vhostmd_py.sources.builtin.source import NativeSource

            # Same worker thread and connection as the VM listing: libvirt
            # calls stay off the loop and one outage is one outage.
            self._native = NativeSource(
                connection=lambda: self._vms.connection() if self._vms is not None else None,
                run_blocking=lambda fn: self._worker.call(fn),
                timeout=self._libvirt_timeout,
            )
        return self._native

    # --- history -------------------------------------------------------------------

    @property
    def history(self) -> History | None:
        """The history in force (None when off)."""
        return self._history

    def _start_history(self, config: Config) -> None:
        if config.history is None:
            return
        from vhostmd_py.history.core import History

        try:
            self._history = History(config.history, update_period=config.update_period)
        except VhostmdError as err:
            log.error("History disabled: %s", err)
            return
        log.info("Recording history in %s", config.history.state_dir)

    async def _stop_history(self) -> None:
        history, self._history = self._history, None
        if history is not None:
            # Waits for the queued RRD writes: off the event loop.
            await asyncio.get_running_loop().run_in_executor(None, history.close)

    async def _cycle_stats(
        self, vms: List[VM], sampled: CycleStats | None, deadline: float | None = None
    ) -> CycleStats | None:
        """This cycle's raw statistics (the built-in metrics' sample when they took one).

        None when they could not be read in time (logged): the history then
        records a gap and the alarms skip the cycle; publishing goes on.
        """
        try:
            if self._stats_source is not None:  # a scripted source (tests, benchmarks)
                return await asyncio.wait_for(
                    self._worker.call(self._stats_source, vms), self._libvirt_timeout
                )
            native = self._native_source()
            if native.last_snapshot is not None and native.last_snapshot is not sampled:
                return native.last_snapshot  # sampled by collect(), our fields included
            # No built-in metric sampled them: one read of its own, by the deadline.
            return await native.sample(native.extra_fields, vms, deadline=deadline)
        except asyncio.TimeoutError:
            log.error(
                "statistics not read within %.0f s: skipped this cycle", self._libvirt_timeout
            )
        except Exception:  # history, alarms and accounting must never cost the metrics
            log.exception("reading the cycle's statistics failed")
        return None

    def _observe_history(
        self, history: History, snapshot: Snapshot, stats: CycleStats
    ) -> Snapshot:
        """Feed the history with the cycle's statistics, add the published values."""
        try:
            return history.decorate(snapshot, history.observe(stats))
        except Exception:  # the history must never cost the metrics
            log.exception("history update failed")
        return snapshot

    async def _list_vms(self, source: LibvirtVMs) -> List[VM]:
        """The running VMs, or [] when libvirt does not answer in time (logged once)."""
        self._listed_ok = False  # until libvirt answers
        if self._pending_list is not None:
            if not self._pending_list.done():
                return []  # the worker is still stuck in the previous call
            self._pending_list = None
        future = asyncio.ensure_future(self._worker.call(source.list_running))
        done, _ = await asyncio.wait({future}, timeout=self._libvirt_timeout)
        if not done:
            self._pending_list = future
            # Retrieve the late result or error so asyncio does not warn about it.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            if not self._libvirt_stuck:
                log.error(
                    "libvirt at %s did not answer within %.0f s: publishing without VM metrics",
                    self.uri or "(default URI)",
                    self._libvirt_timeout,
                )
                self._libvirt_stuck = True
            return []
        if self._libvirt_stuck:
            log.info("libvirt at %s answers again", self.uri or "(default URI)")
            self._libvirt_stuck = False
        try:
            vms = future.result()
            # LibvirtVMs answers [] during an outage: then no VM is "gone".
            self._listed_ok = getattr(source, "last_ok", True)
            return vms
        except Exception:  # a bug or an odd libvirt failure must not cost the host metrics
            log.exception("listing the VMs failed: publishing without VM metrics")
            return []

    def _publish(self, disk: MetricsDisk, snapshot: Snapshot) -> None:
        content = render.document(snapshot)
        self.last_publish_ok = False
        try:
            disk.publish(content)
            self.last_publish_ok = True
            self._published_any = True
            self.health.record_publish(True, self._wall())
        except ContentTooLargeError as err:
            # Upstream's wording, every cycle; the previous document stays readable.
            log.error(
                "Metrics data is larger than metrics disk (%d bytes, the disk holds %d)",
                err.length,
                err.capacity,
            )
            if not self._published_any:
                # Nothing was ever published: the disk still has busy=1 from its
                # creation, which hangs every upstream reader for as long as we run
                # (upstream's own bug, FACTS section 2). An empty document clears it.
                self._publish_empty(disk)
        except VhostmdError as err:
            log.error("Unable to publish metrics: %s", err)
        if not self.last_publish_ok:
            self.health.record_publish(False, self._wall())

    def _publish_empty(self, disk: MetricsDisk) -> None:
        try:
            disk.publish(render.EMPTY_DOCUMENT)
        except VhostmdError as err:
            log.error("Unable to publish an empty metrics document: %s", err)
        else:
            self._published_any = True

    # --- virtio ----------------------------------------------------------------

    async def _start_virtio(self, config: Config) -> None:
        if not self._virtio_wanted(config):
            return
        from vhostmd_py.publish.virtio.server import VirtioServer

        server = VirtioServer(config.virtio, clock=self._clock, reserve_fds=self._runner.fd_need)
        await server.start()
        self._virtio = server
        log.info(
            "Activating virtio, using max_channels %d, expiration_time %d",
            config.virtio.max_channels,
            config.virtio.expiration_time,
        )

    async def _stop_virtio(self) -> None:
        server, self._virtio = self._virtio, None
        if server is not None:
            await server.close()

    # --- reload ------------------------------------------------------------------

    async def _reload(self) -> None:
        """Apply a new config from the same file; keep the old one on any error."""
        self._reload_requested = False
        old = self.config
        if self._config_loader is None:
            log.warning("Reload requested but no configuration file to reload from")
            return
        try:
            new = self._config_loader(old.file)
        except VhostmdError as err:
            log.error("Not reloading, keeping the previous configuration: %s", err)
            return
        disk_changed = (new.disk_path, new.disk_size) != (old.disk_path, old.disk_size)
        vbd = self._publish_enabled and "vbd" in new.transports
        new_disk: MetricsDisk | None = None
        if vbd and self._disk is not None and new.disk_path == old.disk_path and disk_changed:
            # Same file, new size: resized in place (our own lock is on it, a
            # second open would conflict with it), refused when there is no room.
            try:
                self._disk.resize(new.disk_size)
            except VhostmdError as err:
                log.error("Not reloading %s, keeping the previous configuration: %s", new.file, err)
                return
            disk_changed = False
        if vbd and (self._disk is None or disk_changed):
            try:
                # May fail after -u USER when the new path needs root: keep the old.
                new_disk = self._create_disk(new)
            except VhostmdError as err:
                log.error("Not reloading %s, keeping the previous configuration: %s", new.file, err)
                return
        extensions_changed = (
            (new.disk_per_vm, new.freshness, new.update_period, new.virtio.max_channels)
            != (old.disk_per_vm, old.freshness, old.update_period, old.virtio.max_channels)
        )
        if extensions_changed:
            try:
                # The key may be unreadable after -u USER: keep the old config.
                pervm, freshness = self._make_extensions(new)
            except VhostmdError as err:
                if new_disk is not None:
                    new_disk.close()
                log.error("Not reloading %s, keeping the previous configuration: %s", new.file, err)
                return
            if self._pervm is not None:
                self._pervm.close()  # files stay: the guests keep the last document
            self._pervm, self._freshness = pervm, freshness
        if new_disk is not None or not vbd:
            old_disk, self._disk = self._disk, new_disk if new_disk is not None else None
            self._published_any = False
            if old_disk is not None:
                old_disk.close()
        virtio_changed = self._virtio_wanted(new) != self._virtio_wanted(old) or (
            self._virtio_wanted(new) and new.virtio != old.virtio
        )
        if virtio_changed:
            await self._stop_virtio()
        history_changed = (new.history, new.update_period) != (old.history, old.update_period)
        if history_changed:
            await self._stop_history()
        self.config = new
        self._update_monitor(new)
        old_runner, self._runner = self._runner, self._make_runner(new)
        old_runner.close()  # kills what still runs past its cycle's deadline, reaps leftovers
        if self._vms is not None and (not _needs_vms(new) or virtio_changed):
            await self._close_vms()
        if self._vms is None and _needs_vms(new):
            self._vms = self._make_vms(new)
        if virtio_changed:
            try:
                await self._start_virtio(new)
            except (OSError, VhostmdError) as err:
                log.error("Unable to restart the virtio transport: %s", err)
        if history_changed:
            self._start_history(new)
        if new.metrics_endpoint != old.metrics_endpoint:
            # Bound before privileges were dropped: a new address may need root.
            log.warning(
                "metrics_endpoint changes take effect when vhostmd restarts; %s",
                "the endpoint in force stays" if self._endpoint is not None else "none is served",
            )
        log.info("Reloaded configuration from %s", new.file)

    # --- shutdown ----------------------------------------------------------------

    async def _shutdown(self) -> None:
        try:
            await self._stop_virtio()
        except (OSError, VhostmdError) as err:
            log.warning("Closing the virtio transport: %s", err)
        await self._close_vms()
        try:
            await self._stop_history()
        except (OSError, VhostmdError) as err:
            log.warning("Closing the history: %s", err)
        self._worker.shutdown()
        if self.monitor is not None:
            self.monitor.close()
        # Kills and reaps any action a cancelled cycle left behind, and those
        # still running past their cycle's deadline.
        self._runner.close()
        if self._orphans is not None:
            # After the runner: its workers are gone, their leftovers are ours.
            self._orphans.end_all()
        self.close_endpoint()
        self.close_disk()
        pervm, self._pervm = self._pervm, None
        if pervm is not None:
            pervm.close()

    async def _close_vms(self) -> None:
        vms, self._vms = self._vms, None
        if vms is None:
            return
        if self._pending_list is not None and not self._pending_list.done():
            return  # the worker is stuck in libvirt: abandon the connection
        try:
            await asyncio.wait_for(self._worker.call(vms.close), 0.5)
        except (asyncio.TimeoutError, Exception) as err:
            log.debug("closing libvirt: %r", err)

    def close_disk(self) -> None:
        """Close the disk (clears busy if nothing was ever published)."""
        disk, self._disk = self._disk, None
        if disk is not None:
            disk.close()


def _counts(snapshot: Snapshot) -> Tuple[int, int]:
    """(metric elements, VMs) of a cycle, for the operator's log lines."""
    blocks = (snapshot.host, *(b.xml for b in snapshot.vms))
    return sum(b.count(b"<metric ") for b in blocks), len(snapshot.vms)


def describe_config(config: Config) -> Tuple[str, ...]:
    """Upstream's -v start-up lines (disks/basic-1k.verbose-stdout.txt), for INFO logs."""
    lines = [f"Number of metrics nodes: {len(config.metrics)}"]
    for metric in config.metrics:
        lines.append(f"Adding {metric.context} metric '{metric.name}'")
        lines.append(f"\t action: {metric.action}")
    lines.append(f"Using update period of {config.update_period} seconds")
    return tuple(lines)
