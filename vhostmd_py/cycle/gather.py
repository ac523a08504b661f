"""What a cycle reads: the running VMs, every metric's value, the cycle's statistics.

One Gatherer per daemon owns the inputs the loop reads each cycle: the VM
lister and the built-in source (both through the daemon's libvirt Host, so
libvirt calls stay off the loop and one outage is one outage), the action
runner with its shell source (kept across cycles: it knows which actions
still run), and the subreaper of what actions leave behind.

The statistics the history, alarms and accounting read are sampled in the
same libvirt call as the built-in metrics, for every running VM, whatever
<metrics> publishes (a config whose built-in metrics are host-only still
gives them every VM's counters).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable, List, Tuple

from vhostmd_py.cycle.carry import Carry
from vhostmd_py.cycle.snapshot import Snapshot
from vhostmd_py.sources.vm import VM

if TYPE_CHECKING:
    from vhostmd_py.config import Config
    from vhostmd_py.libvirt_host import Host
    from vhostmd_py.sources.base import ShellActionSource, SourceRegistry
    from vhostmd_py.sources.builtin.source import NativeSource
    from vhostmd_py.sources.shell.orphans import OrphanReaper
    from vhostmd_py.sources.shell.runner import ActionRunner
    from vhostmd_py.sources.stats import CycleStats
    from vhostmd_py.sources.vms import LibvirtVMs

log = logging.getLogger(__name__)

# How long a late value is carried when the runner states no action timeout.
DEFAULT_CARRY = 30.0

# A libvirtd that accepts connections but never answers blocks libvirt-python
# calls forever (no keepalive without a libvirt event loop). Past this many
# seconds the cycle goes on without VMs, so host metrics are still published.
LIBVIRT_TIMEOUT = 5.0


def needs_vms(config: Config, *, channels: bool = False) -> bool:
    """Whether a cycle of CONFIG lists the running VMs (CHANNELS: virtio is served)."""
    if (
        channels
        or any(m.context == "vm" for m in config.metrics)
        # One disk per running VM needs the running VMs.
        or config.disk_per_vm is not None
        # The history, alarms and accounting read every VM's counters.
        or config.history is not None
        or config.alarms is not None
        or config.accounting is not None
        # A policy: the shared disk holds what every running VM may see.
        or config.policy is not None
    ):
        return True
    sources = [m.source for m in config.metrics if m.source is not None]
    if not sources:
        return False  # the catalogue is not imported for a config without built-in sources
    from vhostmd_py.sources.builtin.catalogue import needs_libvirt

    # Built-in host fields read from libvirt (node info) need its connection.
    return needs_libvirt(sources)


class Gatherer:
    """The cycle's inputs; every OS boundary a parameter (Host, runner factory)."""

    def __init__(
        self,
        config: Config,
        *,
        host: Host,
        runner_factory: Callable[[Config], ActionRunner],
        channels: Callable[[Config], bool],
        stats_source: Callable[[List[VM]], CycleStats] | None = None,
        libvirt_timeout: float = LIBVIRT_TIMEOUT,
        on_results: Callable[..., None] | None = None,
    ) -> None:
        self.host = host
        self._runner_factory = runner_factory
        self._channels = channels
        # A scripted source of the cycle's statistics (tests, benchmarks),
        # called on the worker thread; else the built-in source samples them.
        self._stats_source = stats_source
        self.libvirt_timeout = libvirt_timeout
        self._on_results = on_results
        self.runner = self._make_runner(config)
        self.carry = self._make_carry(config)
        self._shell: ShellActionSource | None = None  # made with the runner, on first use
        self._native: NativeSource | None = None  # made on first use
        self._vms: LibvirtVMs | None = None
        self._pending_list: asyncio.Future[List[VM]] | None = None
        self._libvirt_stuck = False
        self.listed_ok = True  # whether the last VM listing was libvirt's answer
        self.last_vms: List[VM] = []  # the last cycle's running VMs (the policy step's)
        self._orphans: OrphanReaper | None = None

    def _make_carry(self, config: Config) -> Carry:
        # Carried no longer than an action may run (then it is killed).
        timeout = float(getattr(self.runner, "timeout", None) or DEFAULT_CARRY)
        return Carry(bound=timeout, annotate=config.freshness is not None)

    def _make_runner(self, config: Config) -> ActionRunner:
        runner = self._runner_factory(config)
        if self._on_results is not None:
            runner.on_results = self._on_results
        return runner

    # --- the VMs -------------------------------------------------------------------

    def _lister(self, config: Config) -> LibvirtVMs | None:
        channels = self._channels(config)
        if not needs_vms(config, channels=channels):
            return None
        if self._vms is None:
            from vhostmd_py.sources.vms import LibvirtVMs

            self._vms = LibvirtVMs(self.host.uri, want_channels=channels, host=self.host)
        return self._vms

    async def list_vms(self, config: Config) -> List[VM]:
        """The running VMs, or [] when libvirt does not answer in time (logged once)."""
        self.last_vms = await self._list_vms(config)
        return self.last_vms

    async def _list_vms(self, config: Config) -> List[VM]:
        source = self._lister(config)
        if source is None:
            return []
        self.listed_ok = False  # until libvirt answers
        if self._pending_list is not None:
            if not self._pending_list.done():
                return []  # the worker is still stuck in the previous call
            self._pending_list = None
        future = asyncio.ensure_future(self.host.call(source.list_running))
        done, _ = await asyncio.wait({future}, timeout=self.libvirt_timeout)
        if not done:
            self._pending_list = future
            # Retrieve the late result or error so asyncio does not warn about it.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            if not self._libvirt_stuck:
                log.error(
                    "libvirt at %s did not answer within %.0f s: publishing without VM metrics",
                    self.host.describe(),
                    self.libvirt_timeout,
                )
                self._libvirt_stuck = True
            return []
        if self._libvirt_stuck:
            log.info("libvirt at %s answers again", self.host.describe())
            self._libvirt_stuck = False
        try:
            vms = future.result()
            # LibvirtVMs answers [] during an outage: then no VM is "gone".
            self.listed_ok = source.last_ok
            return vms
        except Exception:  # a bug or an odd libvirt failure must not cost the host metrics
            log.exception("listing the VMs failed: publishing without VM metrics")
            return []

    # --- the values ----------------------------------------------------------------

    def _sources(self, config: Config) -> SourceRegistry:
        """Shell actions, and the built-in source when CONFIG names one; both kept."""
        from vhostmd_py.sources.base import ShellActionSource, SourceRegistry

        if self._shell is None or self._shell.runner is not self.runner:
            self._shell = ShellActionSource(self.runner, path=config.path)
        if not any(m.source is not None for m in config.metrics):
            return SourceRegistry(self._shell)
        from vhostmd_py.sources.builtin.source import is_builtin

        return SourceRegistry(self._shell, [(is_builtin, self.native())])

    def native(self) -> NativeSource:
        """The built-in source, created on first use and kept across cycles."""
        if self._native is None:
            from vhostmd_py.sources.builtin.source import NativeSource

            self._native = NativeSource(
                connection=lambda: self.host.read_only() if self._vms is not None else None,
                run_blocking=self.host.call,
                timeout=self.libvirt_timeout,
            )
        return self._native

    async def collect(
        self, config: Config, vms: List[VM], *, deadline: float | None, stats: bool
    ) -> Tuple[Snapshot, CycleStats | None]:
        """This cycle's Snapshot and, when STATS, its statistics (None: not read in time)."""
        from vhostmd_py.cycle.collect import collect

        if stats and self._stats_source is None:
            from vhostmd_py.sources.builtin.catalogue import COUNTER_FIELDS

            # Sampled in the same libvirt call as the built-in metrics, for every
            # running VM, whatever <metrics> publishes.
            wanted = self.native()
            wanted.extra_fields = COUNTER_FIELDS
            wanted.extra_vms = tuple(vms)
        elif self._native is not None:
            self._native.extra_vms = ()
        native = self._native
        sampled = native.last_snapshot if native is not None else None
        snapshot = await collect(
            config, vms, self.runner, sources=self._sources(config), deadline=deadline,
            carry=self.carry,
        )
        if not stats:
            return snapshot, None
        return snapshot, await self._stats(vms, sampled, deadline)

    async def _stats(
        self, vms: List[VM], sampled: CycleStats | None, deadline: float | None
    ) -> CycleStats | None:
        """This cycle's raw statistics (the built-in metrics' sample when they took one).

        None when they could not be read in time (logged): the history then
        records a gap and the alarms skip the cycle; publishing goes on.
        """
        try:
            if self._stats_source is not None:
                return await asyncio.wait_for(
                    self.host.call(self._stats_source, vms), self.libvirt_timeout
                )
            native = self.native()
            if native.last_snapshot is not None and native.last_snapshot is not sampled:
                return native.last_snapshot  # sampled by collect(), our fields included
            # No built-in metric sampled them: one read of its own, by the deadline.
            return await native.sample(native.extra_fields, vms, deadline=deadline)
        except asyncio.TimeoutError:
            log.error(
                "statistics not read within %.0f s: skipped this cycle", self.libvirt_timeout
            )
        except Exception:  # history, alarms and accounting must never cost the metrics
            log.exception("reading the cycle's statistics failed")
        return None

    # --- actions' orphans ----------------------------------------------------------------

    def reap_orphans(self) -> None:
        """Become the subreaper of what actions leave running (when the kernel allows)."""
        if self._orphans is not None:
            return
        from vhostmd_py.sources.shell.orphans import OrphanReaper, enable_subreaper

        if enable_subreaper():
            self._orphans = OrphanReaper(max_age=self.runner.timeout)

    def sweep(self) -> None:
        """End the orphans past their age (after each cycle)."""
        if self._orphans is None:
            return
        try:
            self._orphans.sweep(self.runner.worker_pids())
        except OSError as err:  # /proc unreadable: metrics matter more
            log.debug("sweeping actions' orphans: %s", err)

    # --- reload and the end ------------------------------------------------------------

    async def reconfigure(self, config: Config) -> None:
        """A new runner for CONFIG (its PATH); a new lister when what it lists changed."""
        old_runner, self.runner = self.runner, self._make_runner(config)
        old_runner.close()  # kills what still runs past its cycle's deadline, reaps leftovers
        self.carry = self._make_carry(config)  # a metric's action may have changed
        vms = self._vms
        channels = self._channels(config)
        if vms is not None and (not needs_vms(config, channels=channels)
                                or vms.want_channels != channels):
            await self._close_vms()

    async def _close_vms(self) -> None:
        vms, self._vms = self._vms, None
        if vms is None:
            return
        vms.close()  # its channel paths
        if self._pending_list is not None and not self._pending_list.done():
            return  # the worker is stuck in libvirt: abandon the connection
        try:
            # Re-opened by the next use (a new lister, the built-in source).
            await asyncio.wait_for(self.host.call(self.host.drop_read_only), 0.5)
        except (asyncio.TimeoutError, Exception) as err:
            log.debug("closing libvirt: %r", err)

    async def close(self) -> None:
        """Close libvirt, stop the worker, end the actions and their orphans."""
        self._vms = None
        if self._pending_list is None or self._pending_list.done():
            try:
                await asyncio.wait_for(self.host.call(self.host.close), 0.5)
            except (asyncio.TimeoutError, Exception) as err:
                log.debug("closing libvirt: %r", err)
        # else the worker is stuck in libvirt: abandon the connection
        self.host.worker.shutdown()
        # Kills and reaps any action a cancelled cycle left behind, and those
        # still running past their cycle's deadline.
        self.runner.close()
        if self._orphans is not None:
            # After the runner: its workers are gone, their leftovers are ours.
            self._orphans.end_all()
