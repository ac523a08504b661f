"""Shared by the history tests: a scripted statistics source with an injected clock."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, List, Sequence

from test_e2e_daemon import CONFIG_TAIL, METRIC

from vhostmd_py.config import Config, load_config
from vhostmd_py.daemon import Daemon
from vhostmd_py.history.core import History
from vhostmd_py.history.rates import DerivedValues
from vhostmd_py.model import Snapshot
from vhostmd_py.runner import ActionRunner
from vhostmd_py.stats import HostStats, StatsSnapshot

WALL0 = 1_700_000_000.0  # a multiple of 5: samples fall on RRD step boundaries
MONO0 = 1000.0

HISTORY_CONFIG = """<?xml version="1.0" ?>
<!DOCTYPE vhostmd SYSTEM "vhostmd.dtd">
<vhostmd>
  <globals>
    <disk>
      <name>host-metrics-disk</name>
      <path>{disk}</path>
      <size unit="k">256</size>
    </disk>
    <update_period>{period}</update_period>
    <path>/usr/sbin:/sbin:/usr/bin:/bin</path>
    <transport>vbd</transport>
    <history state_dir="{state}" retention="{retention}" publish="{publish}"{extra}/>
  </globals>
  <metrics>
"""


def write_history_config(
    path: Path,
    state: Path,
    *,
    period: int = 5,
    retention: str = "7d",
    publish: str = "yes",
    extra: str = "",
) -> Path:
    """A vhostmd.conf with one host metric, a vbd disk beside it and <history>."""
    text = HISTORY_CONFIG.format(
        disk=path.parent / "vhostmd0",
        period=period,
        state=state,
        retention=retention,
        publish=publish,
        extra=extra,
    )
    text += METRIC.format(name="One", type="int32", context="host", action="echo 1")
    path.write_text(text + CONFIG_TAIL)
    return path


class ScriptedClock:
    """Wall and monotonic time that only move when the script says so."""

    def __init__(self, wall: float = WALL0, mono: float = MONO0) -> None:
        self.wall = wall
        self.mono = mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


@dataclass(frozen=True)
class Tick:
    """One scripted cycle: how far the clock moves first, then what the sources report."""

    dt: float
    host: HostStats = field(default_factory=HostStats)
    vms: Sequence[object] = ()


@dataclass
class ScriptedSource:
    """A statistics source yielding a scripted StatsSnapshot sequence, timed by a ScriptedClock.

    On each read it also records what the daemon derived and published in the
    previous cycle (the history's values and the published snapshot).
    """

    ticks: Sequence[Tick]
    clock: ScriptedClock
    daemon: Daemon | None = None
    derived: List[DerivedValues | None] = field(default_factory=list)
    published: List[Snapshot | None] = field(default_factory=list)
    reads: int = 0

    history: History | None = None

    def record(self) -> None:
        """Keep the daemon's last derived values and published snapshot."""
        assert self.daemon is not None
        history = self.history
        self.derived.append(history.last_derived if history is not None else None)
        self.published.append(self.daemon.last_snapshot)

    def __call__(self, vms: object = None) -> StatsSnapshot:
        if self.reads:
            self.record()
        elif self.daemon is not None:
            self.history = self.daemon.history
        tick = self.ticks[self.reads]
        self.reads += 1
        self.clock.advance(tick.dt)
        vms = tuple(replace(vm) for vm in tick.vms)  # type: ignore[type-var]
        return StatsSnapshot(self.clock.wall, self.clock.mono, tick.host, vms)  # type: ignore[arg-type]


def _runner(config: Config) -> ActionRunner:
    return ActionRunner(path=config.path, uri="test:///default", timeout=10)


class _JumpingClock:
    """The daemon's schedule clock: every call is a period later, so no cycle ever sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 100.0
        return self.now


def run_scripted(
    config_path: Path,
    ticks: Sequence[Tick],
    clock: ScriptedClock | None = None,
    *,
    on_daemon: Callable[[Daemon], None] | None = None,
) -> ScriptedSource:
    """Run the daemon for len(ticks) cycles fed by a ScriptedSource; returns the source."""
    source = ScriptedSource(ticks, clock or ScriptedClock())
    daemon = Daemon(
        load_config(config_path),
        uri="test:///default",
        runner_factory=_runner,
        clock=_JumpingClock(),
        stats_source=source,
    )
    source.daemon = daemon
    daemon.open_disk()
    if on_daemon is not None:
        on_daemon(daemon)

    async def main() -> None:
        await daemon.run(max_cycles=len(ticks), signals=False)

    try:
        asyncio.run(main())
    finally:
        daemon.close_disk()
    source.record()  # the last cycle (the closed history keeps its last values)
    return source
