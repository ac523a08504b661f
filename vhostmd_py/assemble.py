"""The daemon's parts, built from a Config; a reload builds anew and swaps what changed.

The loop (vhostmd_py.daemon) runs the same chain every cycle: gather (VMs,
values, statistics), each cycle step, each publisher. What is in the chain
is decided here, from the Config:

- cycle steps (:class:`Step`): the history, the alarms and accounting, the
  freshness metrics. Each observes the cycle's statistics and adds its
  metrics to the snapshot through vhostmd_py.cycle.render.append_metrics;
- publishers (:class:`Publisher`): the shared metrics disk (vbd), the per-VM
  disks, the virtio channels.

Every part sits in a :class:`Slot`: whether a config wants it, how to build
it, and when. "Early" parts (the disks, the host identity) are built before
-u USER drops root (open_disk) and, on a reload, before anything is swapped:
when one cannot be built (a new disk path the user may not create, an
unreadable identity key) the whole new config is refused and the old one
stays. "Late" parts (virtio, history, alarms and accounting) are started by
the loop; on a reload they are stopped and started again only when their
settings changed, and a failure to start one is logged.

A part in force is first asked to take the new config itself
(``reconfigure``): True keeps it (the disk resizes in place, the alarms keep
their state), False has it replaced; a raised VhostmdError refuses the new
config when the part is early. A part is closed when the new config no
longer wants it.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Awaitable,
    Callable,
    Dict,
    List,
    Protocol,
    Sequence,
    Tuple,
    Union,
)

from vhostmd_py.cycle.gather import LIBVIRT_TIMEOUT, Gatherer
from vhostmd_py.errors import VhostmdError
from vhostmd_py.libvirt_host import Host

if TYPE_CHECKING:
    from vhostmd_py.config import Config
    from vhostmd_py.cycle.snapshot import Snapshot
    from vhostmd_py.publish.mdisk import MetricsDisk
    from vhostmd_py.sources.shell.runner import ActionRunner
    from vhostmd_py.sources.stats import CycleStats
    from vhostmd_py.sources.vm import VM

log = logging.getLogger(__name__)

MaybeAwaitable = Union[None, Awaitable[None]]


class Publisher(Protocol):
    """A transport: gets each cycle's snapshot."""

    def publish(self, snapshot: Snapshot, *, listed: bool) -> bool | None:
        """Publish SNAPSHOT (LISTED: the VM list was libvirt's answer, so a VM
        missing from it is gone). True/False: published or not (the daemon's
        publish health, --once's exit status); None: not counted."""

    def reconfigure(self, config: Config) -> bool:
        """Take CONFIG in place (True) or ask to be replaced (False)."""

    def close(self) -> MaybeAwaitable:
        """Release everything (may be a coroutine)."""


class Step(Protocol):
    """A cycle step: observes the cycle's statistics, adds its metrics to the snapshot."""

    reads_stats: bool  # whether the cycle must read its statistics for this step

    async def observe(self, stats: CycleStats | None) -> None:
        """This cycle's statistics (None: they could not be read this cycle)."""

    def decorate(self, snapshot: Snapshot) -> Snapshot:
        """SNAPSHOT with this step's metrics, added through render.append_metrics."""

    def reconfigure(self, config: Config) -> bool:
        """Take CONFIG in place (True) or ask to be replaced (False)."""

    def close(self) -> MaybeAwaitable:
        """Release everything (may be a coroutine)."""


Part = Union[Publisher, Step]


@dataclass(frozen=True)
class Slot:
    """One place in the chain: a publisher or a step, and when it is built."""

    name: str
    kind: str  # "publisher" or "step"
    wanted: Callable[[Config], bool]
    build: Callable[[Config], Any]  # the part (early: synchronously), or an awaitable of it
    early: bool = False
    # Built with the daemon itself (its state is read at once, as root), then
    # handled as a late part.
    with_daemon: bool = False
    # How a late part's failed start is logged (at start-up, by default it raises).
    failure: str = ""
    fatal_at_start: bool = True


async def _close(part: Any) -> None:
    result = part.close()
    if inspect.isawaitable(result):
        await result


def _close_now(part: Any) -> None:
    result = part.close()
    if inspect.isawaitable(result):  # a late part closed outside the loop: cannot wait
        result.close()  # type: ignore[attr-defined]


class Parts:
    """The parts in force, by slot, in chain order."""

    def __init__(self, slots: Sequence[Slot], gather: Gatherer) -> None:
        self.slots = tuple(slots)
        self.gather = gather
        self.by_name: Dict[str, Any] = {}
        # The late parts the loop's end closed, still there to be read.
        self.closed: Dict[str, Any] = {}

    def _kind(self, kind: str) -> List[Any]:
        return [self.by_name[s.name] for s in self.slots
                if s.kind == kind and s.name in self.by_name]

    def publishers(self) -> List[Publisher]:
        """The publishers in force, in chain order."""
        return self._kind("publisher")

    def steps(self) -> List[Step]:
        """The cycle steps in force, in chain order."""
        return self._kind("step")

    def get(self, name: str, *, closed: bool = False) -> Any:
        """The part in slot NAME, or None (CLOSED: or the one the loop's end closed)."""
        part = self.by_name.get(name)
        return self.closed.get(name) if part is None and closed else part

    # --- building ----------------------------------------------------------------

    def build_with_daemon(self, config: Config) -> None:
        """Build the parts made with the daemon (the alarms and accounting)."""
        for slot in self.slots:
            if slot.with_daemon and slot.wanted(config):
                self.by_name[slot.name] = slot.build(config)

    def build_early(self, config: Config) -> None:
        """Build the early parts CONFIG wants (VhostmdError: one cannot be built)."""
        for slot in self.slots:
            if slot.early and slot.name not in self.by_name and slot.wanted(config):
                self.by_name[slot.name] = slot.build(config)

    async def start_late(self, config: Config, *, reloading: bool = False) -> None:
        """Start the late parts CONFIG wants that are not running."""
        for slot in self.slots:
            if slot.early or slot.name in self.by_name or not slot.wanted(config):
                continue
            try:
                part = slot.build(config)
                if inspect.isawaitable(part):
                    part = await part
            except (OSError, VhostmdError) as err:
                if slot.fatal_at_start and not reloading:
                    raise
                log.error("%s: %s", slot.failure or f"Unable to start {slot.name}", err)
                continue
            if part is not None:
                self.by_name[slot.name] = part

    # --- reload ---------------------------------------------------------------------

    def stage(self, new: Config) -> Dict[str, Any] | None:
        """The early parts NEW needs anew (None for those it drops), or None: refused.

        Parts in force that can take NEW in place do so here (a disk resize);
        nothing else changes until commit().
        """
        staged: Dict[str, Any] = {}
        for slot in self.slots:
            if not slot.early:
                continue
            old = self.by_name.get(slot.name)
            try:
                if not slot.wanted(new):
                    if old is not None:
                        staged[slot.name] = None
                    continue
                if old is not None and old.reconfigure(new):
                    continue
                staged[slot.name] = slot.build(new)
            except VhostmdError as err:
                for part in staged.values():
                    if part is not None:
                        _close_now(part)
                log.error("Not reloading %s, keeping the previous configuration: %s",
                          new.file, err)
                return None
        return staged

    async def commit(self, new: Config, staged: Dict[str, Any]) -> None:
        """Swap in STAGED; stop the late parts NEW changes, reconfigure those it keeps."""
        for name, part in staged.items():
            old = self.by_name.pop(name, None)
            if old is not None:
                await _close(old)
            if part is not None:
                self.by_name[name] = part
        for slot in self.slots:
            old = self.by_name.get(slot.name)
            if slot.early or old is None:
                continue
            if slot.wanted(new):
                try:
                    if old.reconfigure(new):
                        continue
                except VhostmdError as err:
                    log.error("%s: %s", slot.failure or f"Reconfiguring {slot.name}", err)
            del self.by_name[slot.name]
            try:
                await _close(old)
            except (OSError, VhostmdError) as err:
                log.warning("Closing %s: %s", slot.name, err)
        await self.gather.reconfigure(new)
        await self.start_late(new, reloading=True)

    # --- the end ---------------------------------------------------------------------

    async def close_late(self) -> None:
        """Stop the late parts (the loop's end)."""
        for slot in self.slots:
            part = self.by_name.get(slot.name)
            if slot.early or part is None:
                continue
            self.closed[slot.name] = self.by_name.pop(slot.name)
            try:
                await _close(part)
            except (OSError, VhostmdError) as err:
                log.warning("Closing %s: %s", slot.name, err)

    def close_early(self, names: Sequence[str] | None = None) -> None:
        """Close the early parts (or those named NAMES): the disks, at the very end."""
        for slot in self.slots:
            if not slot.early or (names is not None and slot.name not in names):
                continue
            part = self.by_name.pop(slot.name, None)
            if part is not None:
                _close_now(part)


class Assembler:
    """Builds the Parts of one daemon from its Config; every OS boundary a parameter.

    EXTRA_SLOTS: more publishers and steps, after the built-in ones (steps
    before the freshness metrics, which are rendered last).
    """

    def __init__(
        self,
        *,
        uri: str | None,
        runner_factory: Callable[[Config], ActionRunner],
        disk_factory: Callable[[str, int], MetricsDisk] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        publish: bool = True,
        use_virtio: bool = True,
        libvirt_timeout: float = LIBVIRT_TIMEOUT,
        stats_source: Callable[[List[VM]], CycleStats] | None = None,
        on_results: Callable[..., None] | None = None,
        extra_slots: Sequence[Slot] = (),
        host: Host | None = None,
    ) -> None:
        self.uri = uri
        self._runner_factory = runner_factory
        self._disk_factory = disk_factory
        self._clock = clock
        self._wall = wall
        self._publish = publish
        self._use_virtio = use_virtio
        self._libvirt_timeout = libvirt_timeout
        self._stats_source = stats_source
        self._on_results = on_results
        self._extra = tuple(extra_slots)
        self.host = host if host is not None else Host(uri)
        # Each VM's own alarm variables (perfmon's <config> in its domain metadata),
        # kept by the policy step, watched by the alarms.
        self.vm_alarms: Dict[str, Tuple[Any, ...]] = {}
        self._gather: Gatherer | None = None

    def virtio_wanted(self, config: Config) -> bool:
        """Whether CONFIG's cycles serve the virtio channels."""
        return self._use_virtio and self._publish and "virtio" in config.transports

    def assemble(self, config: Config) -> Parts:
        """The Parts for CONFIG, nothing built yet (build_early, start_late)."""
        self._gather = Gatherer(
            config,
            host=self.host,
            runner_factory=self._runner_factory,
            channels=self.virtio_wanted,
            stats_source=self._stats_source,
            libvirt_timeout=self._libvirt_timeout,
            on_results=self._on_results,
        )
        return Parts(self.slots(), self._gather)

    def slots(self) -> List[Slot]:
        """The chain, in order: publishers (vbd, per-VM, virtio, extras), then steps."""
        publish = self._publish
        extra_publishers = [s for s in self._extra if s.kind == "publisher"]
        extra_steps = [s for s in self._extra if s.kind == "step"]
        return [
            Slot("vbd", "publisher", lambda c: publish and "vbd" in c.transports,
                 self._vbd, early=True),
            Slot("pervm", "publisher", lambda c: publish and c.disk_per_vm is not None,
                 self._pervm, early=True),
            Slot("virtio", "publisher", self.virtio_wanted, self._virtio,
                 failure="Unable to restart the virtio transport"),
            *extra_publishers,
            Slot("history", "step", lambda c: c.history is not None, self._history,
                 failure="History disabled", fatal_at_start=False),
            Slot("monitor", "step", _monitor_wanted, self._monitor, with_daemon=True,
                 failure="alarms/accounting", fatal_at_start=False),
            *extra_steps,
            Slot("freshness", "step", lambda c: c.freshness is not None, self._freshness,
                 early=True),
            # Last: it attaches to the finished snapshot what each VM may see of it.
            Slot("policy", "step", lambda c: c.policy is not None, self._policy,
                 failure="policy", fatal_at_start=False),
        ]

    # --- the built-in parts -------------------------------------------------------------

    def _vbd(self, config: Config) -> Publisher:
        from vhostmd_py.publish.vbd import VbdPublisher

        return VbdPublisher.create(config, self._disk_factory)

    def _pervm(self, config: Config) -> Publisher:
        from vhostmd_py.publish.pervm import PerVmDisks

        assert config.disk_per_vm is not None
        pervm = PerVmDisks(config.disk_per_vm, max_disks=config.virtio.max_channels,
                           clock=self._clock, disk_factory=self._disk_factory)
        pervm.open()
        log.info("Using per-VM metrics disks %s (%d bytes each)", config.disk_per_vm.path,
                 config.disk_per_vm.size)
        return pervm

    async def _virtio(self, config: Config) -> Publisher:
        from vhostmd_py.publish.virtio.publisher import VirtioPublisher

        assert self._gather is not None
        return await VirtioPublisher.start(config.virtio, clock=self._clock,
                                           reserve_fds=self._gather.runner.fd_need)

    def _history(self, config: Config) -> Step:
        from vhostmd_py.history.step import HistoryStep

        return HistoryStep.create(config)

    def _monitor(self, config: Config) -> Step:
        from vhostmd_py.monitors.step import Monitor, MonitorStep

        vm_alarms = self.vm_alarms
        monitor = Monitor(config, uri=self.uri, host=self.host,
                          vm_variables=lambda uuid: vm_alarms.get(uuid.lower(), ()))
        return MonitorStep(monitor, self.host.call)

    def _freshness(self, config: Config) -> Step:
        from vhostmd_py.cycle.freshness import Freshness

        assert config.freshness is not None
        return Freshness(config.freshness, config.update_period, wall=self._wall)


    def _policy(self, config: Config) -> Step:
        from vhostmd_py.publish.policy import PolicyStep

        assert config.policy is not None and self._gather is not None
        gather = self._gather
        alarms = config.alarms
        vm_alarms = self.vm_alarms

        def variables(vm: VM) -> List[Dict[str, str]]:
            own = vm_alarms.get(vm.uuid.lower(), ())
            names = {v.name for v in own}
            base = alarms.variables_for_vm(vm.uuid, vm.name) if alarms is not None else ()
            return ([{"name": v.name, "origin": "config"} for v in base if v.name not in names]
                    + [{"name": v.name, "origin": "metadata"} for v in own])

        return PolicyStep(config.policy, vms=lambda: gather.last_vms, host=self.host,
                          state_dir=config.policy.state_dir, timeout=self._libvirt_timeout,
                          wall=self._wall, alarms=variables, vm_alarms=vm_alarms)


def _monitor_wanted(config: Config) -> bool:
    return config.alarms is not None or config.accounting is not None
