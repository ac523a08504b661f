"""The metrics loop: fixed-rate cycles, stop and reload requests.

One asyncio loop runs everything (docs/DESIGN.md). Each cycle: gather (the
running VMs, every metric's value, the cycle's statistics), each cycle step
(history, alarms and accounting, freshness), each publisher (the shared
disk, the per-VM disks, virtio). Which parts there are is
vhostmd_py.assemble's, built from the Config; a reload has it build anew and
swap what changed. The process around the loop (start-up order,
daemonizing, pid file) is vhostmd_py.process.life's; which signals stop and
reload is vhostmd_py.signals'. Blocking libvirt calls go to the
libvirt Host's worker thread (vhostmd_py.libvirt_host); actions run in the runner's C batch spawner
(csrc/runner.c) on worker threads with the GIL released; the vbd publish
is a few pwrite() calls done inline, so a signal can never interleave with
it and the disk is never left half written.

Upstream differences (docs/COMPATIBILITY.md; upstream measured in
tests/data/golden/upstream/FACTS.md), all deliberate:
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
disk (resized in place when only its size changed, re-created when its path
changed; the old one is closed with busy clear), the per-VM disks, the
freshness metrics, the virtio settings (the transport is restarted only when
they changed), the history (restarted only when it changed), the alarms and
accounting (in place: unchanged alarm variables keep their state). The
metrics endpoint is bound once, at start-up: a change is logged and takes
effect at the next start. What it
cannot change: the command line (-c URI, -u USER, --jobs, --action-timeout),
and after -u USER a new disk the unprivileged user may not create (then the
whole new config is refused, logged, and the old one stays in force).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Sequence, Tuple

from vhostmd_py.assemble import Assembler, Parts, Slot
from vhostmd_py.cycle.gather import LIBVIRT_TIMEOUT
from vhostmd_py.errors import VhostmdError
from vhostmd_py.logsetup import LIFECYCLE
from vhostmd_py.publish.health import Health
from vhostmd_py.signals import install_loop_signals

if TYPE_CHECKING:
    from vhostmd_py.config import Config
    from vhostmd_py.cycle.snapshot import Snapshot
    from vhostmd_py.history.core import History
    from vhostmd_py.libvirt_host import Host
    from vhostmd_py.monitors.step import Monitor
    from vhostmd_py.publish.endpoint import MetricsEndpoint
    from vhostmd_py.publish.mdisk import MetricsDisk
    from vhostmd_py.sources.shell.runner import ActionRunner
    from vhostmd_py.sources.stats import CycleStats
    from vhostmd_py.sources.vm import VM

log = logging.getLogger(__name__)

__all__ = ["LIBVIRT_TIMEOUT", "Daemon", "describe_config"]

# How long a cancelled cycle may take to wind down (children killed) before we
# stop waiting for it: the whole stop must fit in 2 seconds (docs/COMPATIBILITY.md).
CANCEL_GRACE = 1.2
# The cycle's deadline: its start + period - margin; the margin (this share of
# the period, at most MAX_MARGIN s) is for rendering and publishing, so each
# cycle publishes before the next one is due even when an action hangs.
DEADLINE_MARGIN = 0.2
MAX_MARGIN = 2.0
# Actions always get at least this long after the VM listing (a slow libvirt
# may already have used the cycle's budget: publish late rather than empty).
MIN_ACTION_WINDOW = 0.2


@contextlib.contextmanager
def _endpoint_quiet(endpoint: MetricsEndpoint | None) -> Iterator[List[Snapshot]]:
    """Around one cycle: the endpoint encodes no values while it runs, then
    prepares the Snapshot the cycle published, if it added one to the list
    (vhostmd_py.publish.endpoint.Quiet says why)."""
    published: List[Snapshot] = []
    if endpoint is not None:
        endpoint.cycle_started()
    try:
        yield published
    finally:
        if endpoint is not None:
            endpoint.cycle_ended(published[-1] if published else None)


class Daemon:
    """The metrics daemon: one Config, one libvirt URI, cycles until stopped.

    Every OS boundary is injected: the config loader (reload), the disk
    factory, the action runner factory, the libvirt URI and the clocks.
    EXTRA_SLOTS: more publishers and cycle steps (vhostmd_py.assemble.Slot).
    """

    def __init__(
        self,
        config: Config,
        *,
        uri: str | None,
        runner_factory: Callable[[Config], ActionRunner],
        config_loader: Callable[[str], Config] | None = None,
        disk_factory: Callable[[str, int], MetricsDisk] | None = None,
        clock: Callable[[], float] = time.monotonic,
        publish: bool = True,
        use_virtio: bool = True,
        libvirt_timeout: float = LIBVIRT_TIMEOUT,
        stats_source: Callable[[List[VM]], CycleStats] | None = None,
        reap_orphans: bool = False,
        wall: Callable[[], float] = time.time,
        extra_slots: Sequence[Slot] = (),
        host: Host | None = None,
    ) -> None:
        """HOST: the libvirt boundary to use (default: one for URI)."""
        self.config = config
        self.uri = uri
        self._config_loader = config_loader
        self._clock = clock
        self._wall = wall
        self._reap_orphans = reap_orphans
        # The daemon's own health, for the OpenMetrics endpoint: recorded
        # whether or not an endpoint serves it (a few additions a cycle).
        self.health = Health()
        self.assembler = Assembler(
            uri=uri, runner_factory=runner_factory, disk_factory=disk_factory, clock=clock,
            wall=wall, publish=publish, use_virtio=use_virtio, libvirt_timeout=libvirt_timeout,
            stats_source=stats_source, on_results=self.health.record_actions,
            extra_slots=extra_slots, host=host,
        )
        self.parts: Parts = self.assembler.assemble(config)
        self.parts.build_with_daemon(config)
        self._early_built = False
        self._endpoint: MetricsEndpoint | None = None
        self._deadlines = True
        self._stop: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._reload_requested = False
        self.cycles = 0
        self.last_snapshot: Snapshot | None = None
        # Whether the last publish succeeded (None: none attempted yet);
        # --once turns a failure into a non-zero exit status.
        self.last_publish_ok: bool | None = None
        self._announced = False  # ops: the first-publish line was logged

    # --- what others read -------------------------------------------------------

    @property
    def history(self) -> History | None:
        """The history in force (None when off)."""
        step = self.parts.get("history")
        return step.history if step is not None else None

    @property
    def monitor(self) -> Monitor | None:
        """The alarms and accounting (None when off); after run(), the ones it closed."""
        step = self.parts.get("monitor", closed=True)
        return step.monitor if step is not None else None

    @property
    def endpoint(self) -> MetricsEndpoint | None:
        """The OpenMetrics endpoint serving this daemon, when one was opened."""
        return self._endpoint

    @property
    def virtio_connections(self) -> int:
        """virtio channels connected now (0 without the virtio transport)."""
        server = self.parts.get("virtio")
        return server.connections if server is not None else 0

    # --- start-up (synchronous, before privileges are dropped) ---------------

    def set_config_loader(self, loader: Callable[[str], Config]) -> None:
        """Reload with LOADER from now on (process.run: one that works after -u USER)."""
        self._config_loader = loader

    def open_disk(self) -> None:
        """Build the parts that may need root: the metrics disk, the per-VM disks'
        directory, the host identity (raises VhostmdError, e.g. DiskError)."""
        self.parts.build_early(self.config)
        self._early_built = True

    def open_endpoint(self) -> None:
        """Bind the OpenMetrics endpoint when <metrics_endpoint> asks for one (EndpointError)."""
        endpoint_config = self.config.metrics_endpoint
        if endpoint_config is None or self._endpoint is not None:
            return
        from vhostmd_py.publish.endpoint import MetricsEndpoint

        endpoint = MetricsEndpoint.for_config(endpoint_config, self)
        endpoint.start()
        self._endpoint = endpoint

    def close_endpoint(self) -> None:
        """Stop the OpenMetrics endpoint (idempotent)."""
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            endpoint.close()

    def close_disk(self) -> None:
        """Close the metrics disk (clears busy if nothing was ever published)."""
        self.parts.close_early(["vbd"])

    # --- stop and reload requests (vhostmd_py.signals) ---------------------------------

    def request_stop(self) -> None:
        """Stop as soon as possible (vhostmd_py.signals.STOP_SIGNALS)."""
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
        if self._reap_orphans:
            self.parts.gather.reap_orphans()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        restore: Callable[[], None] | None = None
        if signals:
            restore = install_loop_signals(loop, self.request_stop, self.request_reload)
        try:
            if not self._early_built:
                self.open_disk()
            await self.parts.start_late(self.config)
            await self._loop(max_cycles)
        finally:
            # Handlers stay until the shutdown is done: removing them first
            # would restore SIG_DFL, and a second SIGTERM during the shutdown
            # would kill us before the disk is closed (busy could stay set).
            try:
                await self._shutdown()
            finally:
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
            with _endpoint_quiet(self._endpoint) as published:
                if not await self._run_cycle(due if self._deadlines else None):
                    return  # stopped while the cycle ran
                self.parts.gather.sweep()
                self.cycles += 1
                took = self._clock() - started
                snapshot = self.last_snapshot
                self.health.record_cycle(took, len(snapshot.vms) if snapshot is not None else 0)
                if snapshot is not None:
                    published.append(snapshot)
            if log.isEnabledFor(logging.INFO):  # ops: -v line per cycle
                metrics, vms = _counts(snapshot) if snapshot is not None else (0, 0)
                log.info("cycle %d: %d metrics, %d VMs, %.3f s", self.cycles, metrics, vms, took)
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
        config = self.config
        gather = self.parts.gather
        vms = await gather.list_vms(config)
        deadline = None
        if due is not None:
            # self._clock may be a test's; the sources wait on time.monotonic().
            deadline = time.monotonic() + max(due - self._clock(), MIN_ACTION_WINDOW)
        steps = self.parts.steps()
        snapshot, stats = await gather.collect(
            config, vms, deadline=deadline, stats=any(s.reads_stats for s in steps)
        )
        self.health.record_carried(gather.carry.carried_last)
        for step in steps:
            await step.observe(stats if step.reads_stats else None)
            snapshot = step.decorate(snapshot)
        self.last_snapshot = snapshot
        publishers = self.parts.publishers()
        if not publishers:
            return
        results = [p.publish(snapshot, listed=gather.listed_ok) for p in publishers]
        counted = [ok for ok in results if ok is not None]
        if counted:
            self.last_publish_ok = all(counted)
            self.health.record_publish(self.last_publish_ok, self._wall())
            if self.last_publish_ok and not self._announced:
                self._announced = _log_first_publish(publishers, snapshot)

    # --- reload and shutdown -----------------------------------------------------------

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
        staged = self.parts.stage(new)
        if staged is None:
            return  # refused (logged): the old config stays in force
        self.config = new
        await self.parts.commit(new, staged)
        if new.metrics_endpoint != old.metrics_endpoint:
            # Bound before privileges were dropped: a new address may need root.
            log.warning(
                "metrics_endpoint changes take effect when vhostmd restarts; %s",
                "the endpoint in force stays" if self._endpoint is not None else "none is served",
            )
        log.info("Reloaded configuration from %s", new.file)

    async def _shutdown(self) -> None:
        await self.parts.close_late()
        await self.parts.gather.close()
        self.close_endpoint()
        self.parts.close_early()


def _log_first_publish(publishers: Sequence[Any], snapshot: Snapshot) -> bool:
    """Ops, at the default level: the first cycle whose metrics reached a transport."""
    where = [p.where for p in publishers if getattr(p, "where", None)]
    if not where:
        return False
    metrics, vms = _counts(snapshot)
    logging.getLogger(LIFECYCLE).info(
        "first metrics published on %s: %d metrics, %d VMs", " and ".join(where), metrics, vms
    )
    return True


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
