"""The data sources alarms watch: ONE place for their names, and a rate adapter.

Alarms consume, per cycle and per object (the host, or a VM by UUID with its
name), a flat mapping of data-source name -> float, plus the cycle's time.
This module defines those names and maps the history's derived values
(``vhostmd_py.history.rates.derive``: THE counter rule, one for every
counter of the product) onto them; the names below are the contract.

Names (host and VM unless noted):

=========================  =================================================
``cpu_usage``              percent: host = busy share of all CPUs (/proc/stat
                           ticks, 0..100); VM = CPU time over wall time per
                           vCPU (0..100; 100 = every vCPU busy)
``memory_free_kib``        KiB: host = MemAvailable (else MemFree); VM =
                           balloon ``unused``
``net_rx_bytes_per_s``     VM: bytes/s received by the VM, all interfaces
``net_tx_bytes_per_s``     VM: bytes/s sent by the VM, all interfaces
``vif_<dev>_rx``           VM: bytes/s received on interface <dev> (vnet0 ...)
``vif_<dev>_tx``           VM: bytes/s sent on interface <dev>
``disk_read_bytes_per_s``  VM: bytes/s read, all disks
``disk_write_bytes_per_s`` VM: bytes/s written, all disks
``vbd_<dev>_read``         VM: bytes/s read from disk <dev> (vda ...)
``vbd_<dev>_write``        VM: bytes/s written to disk <dev>
=========================  =================================================

A name is absent when the source did not report its inputs, or on the first
sample of an object (a rate needs two), or when a counter went down or
jumped beyond a plausible rate (a restarted VM, an unplugged device, a wrap:
no rate for that interval, never a negative or a huge one). Alarms judge
every interval, however long: no heartbeat applies here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

from vhostmd_py.cycle.stats import CycleStats, HostStats, VmStats
from vhostmd_py.history.rates import CounterBook, HostRates, VmRates, derive

CPU_USAGE = "cpu_usage"
MEMORY_FREE_KIB = "memory_free_kib"
NET_RX_BYTES_PER_S = "net_rx_bytes_per_s"
NET_TX_BYTES_PER_S = "net_tx_bytes_per_s"
DISK_READ_BYTES_PER_S = "disk_read_bytes_per_s"
DISK_WRITE_BYTES_PER_S = "disk_write_bytes_per_s"


def vif_rx(dev: str) -> str:
    """Per-interface receive rate name."""
    return f"vif_{dev}_rx"


def vif_tx(dev: str) -> str:
    """Per-interface send rate name."""
    return f"vif_{dev}_tx"


def vbd_read(dev: str) -> str:
    """Per-disk read rate name."""
    return f"vbd_{dev}_read"


def vbd_write(dev: str) -> str:
    """Per-disk write rate name."""
    return f"vbd_{dev}_write"


HOST = "host"
VM = "vm"


@dataclass(frozen=True)
class Observation:
    """One object's data-source values at one cycle (what alarms consume)."""

    kind: str  # HOST | VM
    uuid: str  # "" for the host
    name: str  # the VM's name, or the host's name
    time: float  # wall clock seconds of the cycle
    values: Mapping[str, float]
    # Used fraction of the filesystem perfmon's get_percent_fs_usage watches.
    fs_usage: float | None = None


def _host_values(host: HostStats, rates: HostRates) -> Dict[str, float]:
    values: Dict[str, float] = {}
    mem = host.meminfo.get("MemAvailable", host.meminfo.get("MemFree"))
    if mem is not None:
        values[MEMORY_FREE_KIB] = float(mem)
    if rates.cpu_pct is not None:
        values[CPU_USAGE] = rates.cpu_pct
    return values


def _vm_values(vm: VmStats, rates: VmRates) -> Dict[str, float]:
    values: Dict[str, float] = {}
    unused = vm.balloon.get("unused")
    if unused is not None:
        values[MEMORY_FREE_KIB] = float(unused)
    named: List[Tuple[str, float | None]] = [
        (CPU_USAGE, rates.cpu_pct),
        (NET_RX_BYTES_PER_S, rates.net_rx_bytes),
        (NET_TX_BYTES_PER_S, rates.net_tx_bytes),
        (DISK_READ_BYTES_PER_S, rates.disk_rd_bytes),
        (DISK_WRITE_BYTES_PER_S, rates.disk_wr_bytes),
    ]
    for nic in rates.nics:
        named += [(vif_rx(nic.name), nic.rx_bytes), (vif_tx(nic.name), nic.tx_bytes)]
    for disk in rates.disks:
        named += [(vbd_read(disk.name), disk.rd_bytes), (vbd_write(disk.name), disk.wr_bytes)]
    values.update((name, value) for name, value in named if value is not None)
    return values


class RateAdapter:
    """CycleStats after CycleStats -> Observations (host first, then VMs in order)."""

    def __init__(self) -> None:
        self._book = CounterBook.empty()

    def update(self, stats: CycleStats) -> List[Observation]:
        """This cycle's observations; rates are over the time since the previous call."""
        derived, self._book = derive(self._book, stats, heartbeat=math.inf)
        out = [
            Observation(
                HOST, "", stats.host.hostname or "", stats.wall,
                _host_values(stats.host, derived.host),
            )
        ]
        # derive() keeps the snapshot's VM order.
        for vm, rates in zip(stats.vms, derived.vms):
            out.append(Observation(VM, vm.uuid, vm.name, stats.wall, _vm_values(vm, rates)))
        return out
