"""Alarms + accounting as the daemon sees them: one object fed once per cycle.

As a cycle step of the daemon (MonitorStep, vhostmd_py.assemble.Step), per
cycle, after collecting the metrics:

    monitor.observe(stats)            # blocking (libvirt shaping): worker thread
    snapshot = monitor.decorate(snapshot)   # adds the opt-in guest metrics

and ``monitor.reconfigure(config)`` after a reload, ``monitor.close()`` at
exit. ``stats`` is the cycle's CycleStats (vhostmd_py.sources.stats); the alarm
values come from it through ``vhostmd_py.monitors.inputs.RateAdapter`` (the
history's derived values under the alarms' data-source names). The shaper
uses the daemon's libvirt Host (vhostmd_py.libvirt_host), its read-write
connection opened only when a cap must be set or lifted.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Awaitable, Callable, List, Tuple

from vhostmd_py.config import AlarmsConfig, Config
from vhostmd_py.cycle.render import append_metrics
from vhostmd_py.cycle.snapshot import Snapshot
from vhostmd_py.errors import StrPath, VhostmdError
from vhostmd_py.libvirt_host import Host
from vhostmd_py.monitors.accounting import Accounting, LibvirtShaper, Shaper
from vhostmd_py.monitors.alarms import AlarmEngine, AlarmSink, GuestMetric, HookRunner
from vhostmd_py.monitors.inputs import RateAdapter
from vhostmd_py.sources.stats import CycleStats

if TYPE_CHECKING:
    from vhostmd_py.config.records import VariableConfig

log = logging.getLogger(__name__)


def wanted(config: Config) -> bool:
    """Whether the config has an <alarms> or <accounting> section."""
    return config.alarms is not None or config.accounting is not None


class Monitor:
    """The alarm engine and the accounting of one daemon; every OS boundary a parameter."""

    def __init__(
        self,
        config: Config,
        *,
        uri: str | None = None,
        host: Host | None = None,
        state_dir: StrPath | None = None,
        journal_socket: str | None = None,
        shaper: Shaper | None = None,
        boot_id: str | None = None,
        hooks: HookRunner | None = None,
        adapter: RateAdapter | None = None,
        vm_variables: Callable[[str], Tuple[VariableConfig, ...]] | None = None,
    ) -> None:
        """VM_VARIABLES: each VM's own alarm variables by UUID (its domain metadata)."""
        self._uri = uri
        self._vm_variables = vm_variables
        # The daemon's libvirt boundary: the shaper uses its read-write connection.
        self._host = host
        self._state_dir = state_dir
        self._journal_socket = journal_socket
        self._shaper = shaper
        self._boot_id = boot_id
        self._hooks = hooks if hooks is not None else HookRunner()
        # Its /proc, /sys and filesystem roots are parameters (tests).
        self._adapter = adapter if adapter is not None else RateAdapter()
        self.sink: AlarmSink | None = None
        self.alarms: AlarmEngine | None = None
        self.accounting: Accounting | None = None
        self._apply(config)

    def _make_sink(self, alarms: AlarmsConfig, config: Config) -> AlarmSink:
        return AlarmSink(
            alarms,
            state_dir=self._state_dir,
            journal_socket=self._journal_socket,
            hook_path=config.path,
            hooks=self._hooks,
        )

    def _apply(self, config: Config) -> None:
        if config.alarms is not None:
            self._adapter.fs_path = config.alarms.fs_usage_path
            if self.alarms is None:
                self.sink = self._make_sink(config.alarms, config)
                self.alarms = AlarmEngine(config.alarms, self.sink, step=config.update_period,
                                          vm_variables=self._vm_variables)
            else:
                self.alarms.step = config.update_period
                self.alarms.reconfigure(config.alarms)
        else:
            self.alarms = None
            self.sink = None
        if config.accounting is not None:
            if self.accounting is None:
                self.accounting = Accounting(
                    config.accounting,
                    state_dir=self._state_dir,
                    shaper=self._shaper,
                    on_alarm=self._budget_alarm,
                    boot_id=self._boot_id,
                )
            else:
                self.accounting.reconfigure(config.accounting)
            acc = config.accounting
            enforcing = acc.budget.enforce or any(o.enforce for o in acc.overrides)
            # Caps must also be lifted after a reload that removed enforcement.
            restoring = bool(self.accounting.state.get("restore")) or any(
                "capped" in e for e in self.accounting.state["vms"].values()
            )
            if self.accounting.shaper is None and (enforcing or restoring):
                # The Host's read-write connection, apart from the read-only listing one.
                self.accounting.shaper = LibvirtShaper(self._uri, host=self._host)
        else:
            self.accounting = None

    def _budget_alarm(self, alarm: object) -> None:
        from vhostmd_py.monitors.alarms import Alarm

        assert isinstance(alarm, Alarm)
        if self.sink is not None:
            self.sink.emit(alarm)
            self.sink.save(self.alarms.active() if self.alarms is not None else [])
        else:
            log.warning("ALARM %s", alarm.message)

    def reconfigure(self, config: Config) -> None:
        """A reloaded config (SIGHUP): unchanged alarm variables keep their state."""
        self._apply(config)

    def observe(self, stats: CycleStats) -> None:
        """One cycle's statistics (blocking: may call libvirt to cap or restore)."""
        observations = self._adapter.update(stats)
        if self.alarms is not None:
            self.alarms.update(observations)
        if self.accounting is not None:
            self.accounting.update(stats)

    def guest_metrics(self, uuid: str) -> List[GuestMetric]:
        """The opt-in metrics of one VM (alarms, then accounting)."""
        out: List[GuestMetric] = []
        if self.alarms is not None:
            out += self.alarms.guest_metrics(uuid)
        if self.accounting is not None:
            out += self.accounting.guest_metrics(uuid)
        return out

    def decorate(self, snapshot: Snapshot) -> Snapshot:
        """The snapshot with each VM's opt-in metrics appended to its own block only."""
        return append_metrics(
            snapshot, (), {b.vm.uuid: self.guest_metrics(b.vm.uuid) for b in snapshot.vms}
        )

    def close(self) -> None:
        """Stop the hook thread; close the shaper's connection."""
        self._hooks.close()
        shaper = self.accounting.shaper if self.accounting is not None else None
        close: Callable[[], None] | None = getattr(shaper, "close", None)
        if close is not None:
            close()


class MonitorStep:
    """The Monitor as a cycle step of the daemon (vhostmd_py.assemble.Step).

    Observing can cap or restore a VM's rate (libvirt): it runs on RUN_BLOCKING
    (the libvirt Host's worker). Unchanged alarm variables keep their state
    across a reload: the Monitor is reconfigured in place, never rebuilt.
    """

    reads_stats = True

    def __init__(self, monitor: Monitor,
                 run_blocking: Callable[..., Awaitable[None]]) -> None:
        self.monitor = monitor
        self._run_blocking = run_blocking

    async def observe(self, stats: CycleStats | None) -> None:
        """Feed the alarms and the accounting (nothing when the statistics are missing)."""
        if stats is None:
            return
        try:
            await self._run_blocking(self.monitor.observe, stats)
        except VhostmdError as err:
            log.error("alarms/accounting: %s", err)

    def decorate(self, snapshot: Snapshot) -> Snapshot:
        """SNAPSHOT with each VM's opt-in metrics."""
        return self.monitor.decorate(snapshot)

    def reconfigure(self, config: Config) -> bool:
        """Take CONFIG in place (alarm state kept)."""
        self.monitor.reconfigure(config)
        return True

    def close(self) -> None:
        """Stop the hook thread, close the shaper."""
        self.monitor.close()
