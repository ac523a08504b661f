"""Shared by the history tests: a scripted statistics source with an injected clock."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

from helpers.config import write_config
from vhostmd_py.config import Config, load_config
from vhostmd_py.cycle.snapshot import Snapshot
from vhostmd_py.daemon import Daemon
from vhostmd_py.history.core import History
from vhostmd_py.history.rates import DerivedValues
from vhostmd_py.sources.shell.runner import ActionRunner
from vhostmd_py.sources.stats import BlockStats, CycleStats, HostStats, NetStats, VmStats

WALL0 = 1_700_000_000.0  # a multiple of 5: samples fall on RRD step boundaries
MONO0 = 1000.0


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
    history = (f'<history state_dir="{state}" retention="{retention}" publish="{publish}"'
               f"{extra}/>")
    return write_config(path, path.parent / "vhostmd0", [("One", "int32", "host", "echo 1")],
                        size=256, period=period, extra=history)


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
    """A statistics source yielding a scripted CycleStats sequence, timed by a ScriptedClock.

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

    def __call__(self, vms: object = None) -> CycleStats:
        if self.reads:
            self.record()
        elif self.daemon is not None:
            self.history = self.daemon.history
        tick = self.ticks[self.reads]
        self.reads += 1
        self.clock.advance(tick.dt)
        vms = tuple(replace(vm) for vm in tick.vms)  # type: ignore[type-var]
        return CycleStats(self.clock.wall, self.clock.mono, tick.host, vms)  # type: ignore[arg-type]


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


# --- one scripted sequence, with the values it must give (hand-computed) ---

UUID = "11111111-2222-3333-4444-555555555555"
WRAP = 2**32

# Per cycle: dt, vm id, cpu_time (ns), vnet0 (rx, tx, rx_pk, tx_pk), vda (rd, wr, rd_req, wr_req)
VM_SCRIPT: List[
    Tuple[float, int, int, Tuple[int, int, int, int], Tuple[int, int, int, int | None]]
] = [
    (0, 1, 10 * 10**9, (1000, WRAP - 1000, 10, 10), (0, 0, 0, 0)),  # first sample
    (5, 1, 15 * 10**9, (6000, WRAP - 500, 60, 20), (51200, 0, 5, None)),  # wr_req absent
    (5, 1, 40 * 10**9, (6000, 500, 60, 20), (51200, 5000, 5, 10)),  # tx wraps; CPU > 100 %
    (5, 1, 1 * 10**9, (1000, 1500, 60, 20), (51200, 5000, 5, 20)),  # cpu and rx go down
    (30, 1, 2 * 10**9, (2000, 2500, 70, 30), (51200, 5000, 5, 30)),  # gap > heartbeat (10 s)
    (5, 1, 4 * 10**9, (7000, 2500, 70, 30), (51200, 5000, 5, 30)),
    (5, 2, 9 * 10**9, (9000, 3000, 80, 40), (61200, 6000, 6, 31)),  # restarted: new id
    (5, 2, 14 * 10**9, (10000, 3000, 80, 40), (61200, 6000, 6, 31)),
]

# Per cycle: user, system, idle, iowait ticks (USER_HZ 100, 2 CPUs: 1000 ticks per 5 s)
HOST_SCRIPT = [
    (1000, 500, 8000, 100),
    (1300, 600, 8500, 200),  # busy 400 of 1000 -> 40 %, iowait 10 %
    (1800, 600, 9000, 200),  # 50 %
    (2050, 600, 9750, 200),  # 25 %
    (2500, 600, 14800, 200),  # after the gap: unknown
    (3500, 600, 14800, 200),  # 100 %
    (3500, 600, 15800, 200),  # 0 %
    (4000, 600, 16300, 200),  # 50 %
]

# Hand-computed expectations, per cycle.
EXPECT_VM_CPU = [None, 50.0, 100.0, None, None, 20.0, None, 50.0]
EXPECT_RX = [None, 1000.0, 0.0, None, None, 1000.0, None, 200.0]
EXPECT_TX = [None, 100.0, None, 200.0, None, 0.0, None, 0.0]
EXPECT_RX_PK = [None, 10.0, 0.0, 0.0, None, 0.0, None, 0.0]
EXPECT_RD = [None, 10240.0, 0.0, 0.0, None, 0.0, None, 0.0]
EXPECT_WR = [None, 0.0, 1000.0, 0.0, None, 0.0, None, 0.0]
EXPECT_WR_REQ = [None, None, None, 2.0, None, 0.0, None, 0.0]
EXPECT_HOST = [None, 40.0, 50.0, 25.0, None, 100.0, 0.0, 50.0]
EXPECT_IOWAIT = [None, 10.0, 0.0, 0.0, None, 0.0, 0.0, 0.0]


def scripted_ticks() -> List[Tick]:
    ticks = []
    for (dt, vid, cpu, net, blk), (user, system, idle, iowait) in zip(VM_SCRIPT, HOST_SCRIPT):
        vm = VmStats(
            uuid=UUID,
            name="web1",
            id=vid,
            vcpus=2,
            cpu_time=cpu,
            nics=(
                NetStats(
                    "vnet0", rx_bytes=net[0], tx_bytes=net[1], rx_packets=net[2], tx_packets=net[3]
                ),
            ),
            disks=(
                BlockStats("vda", rd_bytes=blk[0], wr_bytes=blk[1], rd_req=blk[2], wr_req=blk[3]),
            ),
        )
        host = HostStats(
            cpus=2,
            cpu_ticks={
                "user": user,
                "nice": 0,
                "system": system,
                "idle": idle,
                "iowait": iowait,
                "irq": 0,
                "softirq": 0,
                "steal": 0,
            },
            clock_ticks=100,
            meminfo={"MemTotal": 1000, "MemAvailable": 250},
            loadavg=(0.5, 0.25, 0.125),
        )
        ticks.append(Tick(dt, host, (vm,)))
    return ticks
