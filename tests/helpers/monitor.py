"""Shared by the alarms and accounting tests: configs and a scripted statistics source."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Sequence

from helpers.config import write_config
from vhostmd_py.sources.stats import CycleStats, HostStats, NetStats, VmStats
from vhostmd_py.sources.vm import VM


def write_conf(path: Path, extra: str) -> Path:
    """A minimal vhostmd.conf (update_period 10) with EXTRA sections after <metrics>."""
    return write_config(path, path.parent / "vhostmd0", [("Dummy", "string", "vm", "echo x")],
                        size=256, period=10, search_path="/usr/bin:/bin", after_metrics=extra)


class ScriptedSource:
    """StatsSnapshots from a script, one per call, on an injected clock of 10 s steps.

    Each step maps a VM name to (cpu percent, tx bytes/s); counters are
    integrated from them so the derived rates are exactly the scripted values.
    The VMs are the ones the daemon lists from libvirt (real names, uuids).
    """

    def __init__(
        self,
        steps: Sequence[Dict[str, tuple[float, float]]],
        *,
        start: float = 1_000_000.0,
        step: float = 10.0,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.steps = list(steps)
        self.wall = start
        self.step = step
        self.calls = 0
        self.on_step = on_step
        self.cpu: Dict[str, int] = {}
        self.tx: Dict[str, int] = {}
        self.times: List[float] = []

    def __call__(self, vms: List[VM]) -> CycleStats:
        index = self.calls
        self.calls += 1
        if index > 0:
            self.wall += self.step
        self.times.append(self.wall)
        values = self.steps[min(index, len(self.steps) - 1)]
        out = []
        for vm in vms:
            cpu_pct, tx_rate = values.get(vm.name, (0.0, 0.0))
            if index > 0:
                self.cpu[vm.uuid] = self.cpu.get(vm.uuid, 0) + int(cpu_pct / 100 * self.step * 1e9)
                self.tx[vm.uuid] = self.tx.get(vm.uuid, 0) + int(tx_rate * self.step)
            out.append(
                VmStats(
                    uuid=vm.uuid,
                    name=vm.name,
                    id=vm.id,
                    vcpus=1,
                    cpu_time=self.cpu.get(vm.uuid, 0),
                    nics=(NetStats("vnet0", rx_bytes=0, tx_bytes=self.tx.get(vm.uuid, 0)),),
                )
            )
        if self.on_step is not None:
            self.on_step(index)
        return CycleStats(wall=self.wall, mono=self.wall, host=HostStats(), vms=tuple(out))


def fast_clock() -> Callable[[], float]:
    """A monotonic clock that jumps 1000 s per reading: the daemon never sleeps."""
    state = [0.0]

    def clock() -> float:
        state[0] += 1000.0
        return state[0]

    return clock
