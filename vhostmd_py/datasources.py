"""The data sources alarms watch: ONE place for their names, and a rate adapter.

Alarms consume, per cycle and per object (the host, or a VM by UUID with its
name), a flat mapping of data-source name -> float, plus the cycle's time.
This module defines those names and computes them from two consecutive
StatsSnapshots (counter deltas over the monotonic time between them). When
the derived values of ``vhostmd_py.history`` are merged, ``RateAdapter`` is
the one thing to switch: the names below are the contract.

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
sample of an object (a rate needs two), or when a counter went down (a
restarted VM or an unplugged device: no rate for that interval, never a
negative or a huge one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

from vhostmd_py.stats import HostStats, StatsSnapshot, VmStats

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


def _rate(new: int | None, old: int | None, dt: float) -> float | None:
    if new is None or old is None or dt <= 0 or new < old:
        return None
    return (new - old) / dt


def _host_values(cur: HostStats, prev: HostStats | None) -> Dict[str, float]:
    values: Dict[str, float] = {}
    mem = cur.meminfo.get("MemAvailable", cur.meminfo.get("MemFree"))
    if mem is not None:
        values[MEMORY_FREE_KIB] = float(mem)
    if prev is not None and cur.cpu_ticks and prev.cpu_ticks:
        # guest/guest_nice are already inside user/nice in /proc/stat.
        keys = [k for k in cur.cpu_ticks if k not in ("guest", "guest_nice")]
        total = sum(cur.cpu_ticks[k] - prev.cpu_ticks.get(k, 0) for k in keys)
        idle = sum(
            cur.cpu_ticks.get(k, 0) - prev.cpu_ticks.get(k, 0) for k in ("idle", "iowait")
        )
        if total > 0 and idle >= 0:
            values[CPU_USAGE] = 100.0 * (total - idle) / total
    return values


def _sum_rates(pairs: List[Tuple[int | None, int | None]], dt: float) -> float | None:
    rates = [_rate(new, old, dt) for new, old in pairs]
    if not rates or any(r is None for r in rates):
        return None
    return sum(r for r in rates if r is not None)


def _vm_values(cur: VmStats, prev: VmStats | None, dt: float) -> Dict[str, float]:
    values: Dict[str, float] = {}
    unused = cur.balloon.get("unused")
    if unused is not None:
        values[MEMORY_FREE_KIB] = float(unused)
    # A different domain ID is another run of the VM: its counters restarted.
    if prev is None or prev.id != cur.id:
        return values
    cpu = _rate(cur.cpu_time, prev.cpu_time, dt)
    if cpu is not None and cur.vcpus:
        values[CPU_USAGE] = 100.0 * cpu / 1e9 / cur.vcpus
    old_nics = {n.name: n for n in prev.nics}
    rx_pairs, tx_pairs = [], []
    for nic in cur.nics:
        old = old_nics.get(nic.name)
        if old is None:
            continue
        rx, tx = _rate(nic.rx_bytes, old.rx_bytes, dt), _rate(nic.tx_bytes, old.tx_bytes, dt)
        if rx is not None:
            values[vif_rx(nic.name)] = rx
        if tx is not None:
            values[vif_tx(nic.name)] = tx
        rx_pairs.append((nic.rx_bytes, old.rx_bytes))
        tx_pairs.append((nic.tx_bytes, old.tx_bytes))
    for name, pairs in ((NET_RX_BYTES_PER_S, rx_pairs), (NET_TX_BYTES_PER_S, tx_pairs)):
        total = _sum_rates(pairs, dt)
        if total is not None:
            values[name] = total
    old_disks = {d.name: d for d in prev.disks}
    rd_pairs, wr_pairs = [], []
    for disk in cur.disks:
        old_disk = old_disks.get(disk.name)
        if old_disk is None:
            continue
        rd = _rate(disk.rd_bytes, old_disk.rd_bytes, dt)
        wr = _rate(disk.wr_bytes, old_disk.wr_bytes, dt)
        if rd is not None:
            values[vbd_read(disk.name)] = rd
        if wr is not None:
            values[vbd_write(disk.name)] = wr
        rd_pairs.append((disk.rd_bytes, old_disk.rd_bytes))
        wr_pairs.append((disk.wr_bytes, old_disk.wr_bytes))
    for name, pairs in ((DISK_READ_BYTES_PER_S, rd_pairs), (DISK_WRITE_BYTES_PER_S, wr_pairs)):
        total = _sum_rates(pairs, dt)
        if total is not None:
            values[name] = total
    return values


class RateAdapter:
    """StatsSnapshot after StatsSnapshot -> Observations (host first, then VMs in order)."""

    def __init__(self) -> None:
        self._prev: StatsSnapshot | None = None

    def update(self, stats: StatsSnapshot) -> List[Observation]:
        """This cycle's observations; rates are over the time since the previous call."""
        prev = self._prev
        self._prev = stats
        dt = stats.mono - prev.mono if prev is not None else 0.0
        host_name = stats.host.hostname or ""
        out = [
            Observation(
                HOST,
                "",
                host_name,
                stats.wall,
                _host_values(stats.host, prev.host if prev is not None else None),
            )
        ]
        old_vms = {v.uuid: v for v in prev.vms} if prev is not None else {}
        for vm in stats.vms:
            out.append(
                Observation(
                    VM, vm.uuid, vm.name, stats.wall, _vm_values(vm, old_vms.get(vm.uuid), dt)
                )
            )
        return out
