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

perfmon's names, for variables in perfmon's format (its units: fractions):

=========================  =================================================
``cpu<N>``                 VM: vCPU N's busy fraction (0..1, its CPU time
                           over wall time); host: CPU N's busy fraction
                           (/proc/stat's cpuN line: not idle, not iowait)
``vif_<N>_rx``, ``_tx``    VM: bytes/s of the VM's Nth interface (0, 1, ...
                           in the domain XML's order), XenServer's names
``pif_<dev>_rx``, ``_tx``  host: bytes/s received and sent by each physical
                           interface (/proc/net/dev; physical: it has
                           /sys/class/net/<dev>/device)
(the ``vbd_<dev>_*`` above) VM: what perfmon's disk_usage selects
=========================  =================================================

and, for perfmon's ``get_percent_fs_usage`` (``Observation.fs_usage``), the
used fraction of the filesystem holding a path (default ``/``, the root
filesystem perfmon's ``df /etc/passwd`` read), as df rounds it: up, to a
whole percent.

A name is absent when the source did not report its inputs at all. Its value
is NaN (known to exist, unknown now) on the first sample of an object (a rate
needs two), or when a counter went down or jumped beyond a plausible rate (a
restarted VM, an unplugged device, a wrap: no rate for that interval, never a
negative or a huge one): our own format leaves NaN values out, perfmon's
arithmetic carries them (its NaN is never bad). Alarms judge every interval,
however long: no heartbeat applies here. Every file path is a parameter
(``proc_root``, ``sys_root``, ``fs_root``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, Hashable, List, Mapping, Tuple

from vhostmd_py.history.rates import (
    MAX_BYTES_RATE,
    Counter,
    CounterBook,
    HostRates,
    VmRates,
    advance,
    derive,
)
from vhostmd_py.sources.stats import CycleStats, HostStats, VmStats

log = logging.getLogger(__name__)
NAN = float("nan")

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


def _known(value: float | None) -> float:
    return NAN if value is None else float(value)


def _host_values(host: HostStats, rates: HostRates) -> Dict[str, float]:
    values: Dict[str, float] = {}
    mem = host.meminfo.get("MemAvailable", host.meminfo.get("MemFree"))
    if mem is not None:
        values[MEMORY_FREE_KIB] = float(mem)
    if host.cpu_ticks:
        values[CPU_USAGE] = _known(rates.cpu_pct)
    return values


def _vm_values(vm: VmStats, rates: VmRates) -> Dict[str, float]:
    values: Dict[str, float] = {}
    unused = vm.balloon.get("unused")
    if unused is not None:
        values[MEMORY_FREE_KIB] = float(unused)
    for index, nic in enumerate(rates.nics):
        values[f"vif_{index}_rx"] = _known(nic.rx_bytes)
        values[f"vif_{index}_tx"] = _known(nic.tx_bytes)
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
    if vm.cpu_time is not None:
        values[CPU_USAGE] = _known(rates.cpu_pct)
    values.update((name, _known(value)) for name, value in named[1:]
                  if value is not None or _reported(vm, name))
    return values


def _reported(vm: VmStats, name: str) -> bool:
    """Whether the source reported the inputs of data source NAME (its value may be unknown)."""
    if name.startswith(("net_", "vif_")):
        return bool(vm.nics)
    if name.startswith(("disk_", "vbd_")):
        return bool(vm.disks)
    return False


def fs_usage(path: str) -> float | None:
    """The used fraction of PATH's filesystem as df prints it (percent rounded up) / 100."""
    try:
        st = os.statvfs(path)
    except OSError as err:
        log.debug("fs_usage of %s: %s", path, err)
        return None
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    avail = st.f_bavail * st.f_frsize
    if used + avail <= 0:
        return None
    return math.ceil(100 * used / (used + avail)) / 100.0


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def host_cpu_ticks(proc_root: str) -> Dict[int, Tuple[int, int]]:
    """{N: (busy, total)} ticks of each cpuN line of /proc/stat (busy: not idle, not iowait)."""
    text = _read(os.path.join(proc_root, "stat")) or ""
    out: Dict[int, Tuple[int, int]] = {}
    for line in text.splitlines():
        head, _, rest = line.partition(" ")
        if not head.startswith("cpu") or not head[3:].isdigit():
            continue
        try:
            ticks = [int(x) for x in rest.split()[:8]]
        except ValueError:
            continue
        if len(ticks) < 4:
            continue
        total = sum(ticks)
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        out[int(head[3:])] = (total - idle, total)
    return out


def host_nic_bytes(proc_root: str, sys_root: str) -> Dict[str, Tuple[int, int]]:
    """{dev: (rx bytes, tx bytes)} of the physical interfaces in /proc/net/dev."""
    text = _read(os.path.join(proc_root, "net", "dev")) or ""
    out: Dict[str, Tuple[int, int]] = {}
    for line in text.splitlines():
        dev, sep, rest = line.partition(":")
        dev = dev.strip()
        fields = rest.split()
        if not sep or not dev or len(fields) < 9 or "/" in dev or dev.startswith("."):
            continue
        if not os.path.exists(os.path.join(sys_root, "class", "net", dev, "device")):
            continue  # lo, bridges, taps of VMs (their traffic is the VMs')
        try:
            out[dev] = (int(fields[0]), int(fields[8]))
        except ValueError:
            continue
    return out


class RateAdapter:
    """CycleStats after CycleStats -> Observations (host first, then VMs in order)."""

    def __init__(
        self,
        *,
        proc_root: str = "/proc",
        sys_root: str = "/sys",
        fs_root: str = "/",
        fs_path: str = "/",
    ) -> None:
        self._book = CounterBook.empty()
        self._counters: Dict[Hashable, Counter] = {}
        self.proc_root = proc_root
        self.sys_root = sys_root
        self.fs_root = fs_root
        self.fs_path = fs_path

    def _rate(self, new: Dict[Hashable, Counter], key: Hashable, value: int, mono: float,
              max_rate: float | None) -> float:
        step = advance(self._counters.get(key), value, mono, heartbeat=math.inf,
                       max_rate=max_rate)
        if step.state is not None:
            new[key] = step.state
        rate = step.rate
        return NAN if rate is None else rate

    def _perfmon_host(self, new: Dict[Hashable, Counter], mono: float) -> Dict[str, float]:
        values: Dict[str, float] = {}
        for n, (busy, total) in host_cpu_ticks(self.proc_root).items():
            busy_rate = self._rate(new, ("host", "cpu", n, "busy"), busy, mono, None)
            total_rate = self._rate(new, ("host", "cpu", n, "total"), total, mono, None)
            values[f"cpu{n}"] = (
                min(max(busy_rate / total_rate, 0.0), 1.0)
                if total_rate > 0 and not math.isnan(busy_rate) else NAN
            )
        for dev, (rx, tx) in host_nic_bytes(self.proc_root, self.sys_root).items():
            values[f"pif_{dev}_rx"] = self._rate(new, ("host", "pif", dev, "rx"), rx, mono,
                                                 MAX_BYTES_RATE)
            values[f"pif_{dev}_tx"] = self._rate(new, ("host", "pif", dev, "tx"), tx, mono,
                                                 MAX_BYTES_RATE)
        return values

    def _perfmon_vm(self, new: Dict[Hashable, Counter], vm: VmStats, mono: float
                    ) -> Dict[str, float]:
        values: Dict[str, float] = {}
        for n, ns in enumerate(vm.vcpu_times):
            rate = self._rate(new, ("vm", vm.uuid, vm.id, "vcpu", n), ns, mono, None)
            values[f"cpu{n}"] = NAN if math.isnan(rate) else min(max(rate / 1e9, 0.0), 1.0)
        return values

    def update(self, stats: CycleStats) -> List[Observation]:
        """This cycle's observations; rates are over the time since the previous call."""
        derived, self._book = derive(self._book, stats, heartbeat=math.inf)
        new: Dict[Hashable, Counter] = {}
        fs = fs_usage(os.path.join(self.fs_root, self.fs_path.lstrip("/")))
        host = _host_values(stats.host, derived.host)
        host.update(self._perfmon_host(new, stats.mono))
        out = [Observation(HOST, "", stats.host.hostname or "", stats.wall, host, fs)]
        # derive() keeps the snapshot's VM order.
        for vm, rates in zip(stats.vms, derived.vms):
            values = _vm_values(vm, rates)
            values.update(self._perfmon_vm(new, vm, stats.mono))
            out.append(Observation(VM, vm.uuid, vm.name, stats.wall, values, fs))
        self._counters = new  # counters not seen this cycle are forgotten
        return out
