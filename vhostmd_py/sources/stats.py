"""Raw statistics of one cycle, as the built-in sources read them.

This is the contract between the built-in sources (libvirt bulk/per-domain
calls, /proc and /sys) and everything that consumes counters rather than
rendered metrics: the metric catalogue (rendering), the derived rates and the
round-robin history, alarms and accounting. A field is None (or a device is
absent) when the hypervisor or the kernel did not report it: consumers leave
the value out, they never invent a zero.

Units are the ones the sources report, kept integral where they are counters:
CPU times in nanoseconds, memory in KiB (libvirt's unit), bytes and packets as
counts. Times are taken once per cycle: ``wall`` (seconds since the epoch, for
RRD updates and accounting periods) and ``mono`` (a monotonic clock, for rates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Tuple


@dataclass(frozen=True)
class BlockStats:
    """One disk of a VM, named as the domain XML's <target dev=...> (vda, sdb, ...)."""

    name: str
    rd_req: int | None = None
    rd_bytes: int | None = None
    wr_req: int | None = None
    wr_bytes: int | None = None
    errors: int | None = None
    capacity: int | None = None  # bytes
    allocation: int | None = None  # bytes


@dataclass(frozen=True)
class NetStats:
    """One interface of a VM, named as the domain XML's <target dev=...> (vnet0, ...)."""

    name: str
    rx_bytes: int | None = None
    rx_packets: int | None = None
    rx_errs: int | None = None
    rx_drop: int | None = None
    tx_bytes: int | None = None
    tx_packets: int | None = None
    tx_errs: int | None = None
    tx_drop: int | None = None


@dataclass(frozen=True)
class VmStats:
    """Everything the built-in sources know about one running VM this cycle."""

    uuid: str
    name: str
    id: int
    state: int | None = None  # libvirt's virDomainState
    vcpus: int | None = None  # current vCPUs
    max_vcpus: int | None = None
    cpu_time: int | None = None  # ns, all vCPUs + emulator
    cpu_user: int | None = None  # ns
    cpu_system: int | None = None  # ns
    vcpu_times: Tuple[int, ...] = ()  # ns per vCPU, by vCPU number
    memory_max: int | None = None  # KiB, maximum memory
    memory_current: int | None = None  # KiB, current balloon / memory
    # Balloon statistics by libvirt's names (actual, unused, available,
    # usable, rss, swap_in, swap_out, major_fault, minor_fault, ...), KiB
    # except the fault counts.
    balloon: Mapping[str, int] = field(default_factory=dict)
    disks: Tuple[BlockStats, ...] = ()
    nics: Tuple[NetStats, ...] = ()


@dataclass(frozen=True)
class HostStats:
    """The host's counters and sizes this cycle."""

    hostname: str | None = None  # libvirt's virConnectGetHostname (virsh hostname)
    nodename: str | None = None  # os.uname().nodename (hostname(1))
    vendor: str | None = None  # os-release VENDOR_NAME, else NAME
    hypervisor: str | None = None  # virConnectGetType: "QEMU", "TEST", ...
    hypervisor_version: int | None = None  # virConnectGetVersion, packed major*1e6+minor*1e3+micro
    libvirt_version: int | None = None  # virConnectGetLibVersion, packed likewise
    cpus: int | None = None  # logical CPUs (nodeinfo / online CPUs)
    node_memory_mib: int | None = None  # nodeinfo memory size, MiB (virNodeGetInfo >> 10)
    online_cpus: int | None = None  # CPUs listed in /sys/devices/system/cpu/online
    page_size: int = 4096  # bytes, os.sysconf("SC_PAGE_SIZE")
    # Derived per second from two /proc/vmstat samples (the previous cycle's,
    # or one second apart on the first cycle, as the shell action did).
    page_in_rate: int | None = None  # KiB paged in per second (pgpgin)
    page_fault_rate: int | None = None  # page faults per second (pgfault)
    # /proc/stat's aggregate "cpu" line in USER_HZ ticks by name (user, nice,
    # system, idle, iowait, irq, softirq, steal, guest, guest_nice).
    cpu_ticks: Mapping[str, int] = field(default_factory=dict)
    clock_ticks: int = 100  # USER_HZ, os.sysconf("SC_CLK_TCK")
    meminfo: Mapping[str, int] = field(default_factory=dict)  # /proc/meminfo, KiB
    vmstat: Mapping[str, int] = field(default_factory=dict)  # /proc/vmstat counters
    loadavg: Tuple[float, float, float] | None = None


@dataclass(frozen=True)
class CycleStats:
    """One cycle's raw statistics: the host and every running VM, in libvirt's order."""

    wall: float
    mono: float
    host: HostStats
    vms: Tuple[VmStats, ...] = ()
