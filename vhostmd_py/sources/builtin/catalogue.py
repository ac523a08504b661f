"""The catalogue of built-in source fields: what `<source>FIELD</source>` may name.

Each field says which context it belongs to, what kind of value it gives (so
the config can refuse a string field in a uint64 metric), which raw
statistics it needs (so a cycle reads only those), and how its value is
formatted from a :class:`vhostmd_py.sources.stats.CycleStats`. The formats are
those of the shell actions the shipped configs used before (``awk printf
"%d"`` truncation for MiB, ``%f`` for the host CPU time, virsh's ``%.1f`` for a
VM's CPU time), so a guest sees the same values whichever way they are made.

This module never imports libvirt: config.py validates against it.
docs/METRICS.md documents every field (tests check the two agree).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, FrozenSet, Mapping, Sequence, Tuple, Union

from vhostmd_py.sources.stats import BlockStats, CycleStats, HostStats, NetStats, VmStats

MIB_KIB = 1024
MIB = 1024 * 1024

# What a field needs read. Host: "proc" (/proc files), "sys", "libvirt"
# (node info, type, versions), "rates" (two vmstat samples), "local" (uname,
# os-release, clock). VM groups (libvirt): "info" (state, CPU time, vCPUs,
# memory), "cpu_split" (user/system), "balloon", "vcpu", "block", "net".
VM_GROUPS = ("info", "cpu_split", "balloon", "vcpu", "block", "net")

Device = Union[BlockStats, NetStats, "VcpuTime", "MemoryStat"]


@dataclass(frozen=True)
class VcpuTime:
    """One vCPU's time as a per-device record (named cpu0, cpu1, ... as nova does)."""

    name: str
    time: int | None  # ns


@dataclass(frozen=True)
class MemoryStat:
    """One of libvirt's memory statistics as a per-device record (nova's memory-KEY)."""

    name: str  # libvirt's key, "-" as "_" (last_update, hugetlb_pgalloc, ...)
    value: int


@dataclass(frozen=True)
class Field:
    """One built-in source field."""

    name: str
    context: str  # "host" | "vm"
    kind: str  # "string" | "int" | "real" | "group"
    unit: str  # of the value as rendered ("" when none)
    meaning: str
    needs: FrozenSet[str]
    host_value: Callable[[CycleStats], str | None] | None = None
    vm_value: Callable[[VmStats], str | None] | None = None
    device: str | None = None  # "disk" | "nic" | "vcpu" | "memory": one element per device
    device_value: Callable[[Device], str | None] | None = None
    variables: Tuple[str, ...] = ()  # a group's values, in order

    def compatible_types(self) -> Tuple[str, ...]:
        """The metric types this field's value may be published as."""
        if self.kind == "string":
            return ("string",)
        if self.kind == "real":
            return ("real32", "real64", "string")
        if self.kind == "group":
            return ("group",)
        return ("int32", "uint32", "int64", "uint64", "real32", "real64", "string")


def _i(value: int | None) -> str | None:
    return None if value is None else str(value)


def _mib(kib: int | None) -> str | None:
    # awk's printf "%d" of KiB / 1024: truncation (values are never negative).
    return None if kib is None else str(kib // MIB_KIB)


def _version(packed: int | None) -> str | None:
    if packed is None:
        return None
    return f"{packed // 1000000}.{(packed // 1000) % 1000}.{packed % 1000}"


def _mem_available(h: HostStats) -> int | None:
    m = h.meminfo
    if "MemAvailable" in m:
        return m["MemAvailable"]
    # Kernels before 3.14: what the shell actions count instead.
    if all(k in m for k in ("MemFree", "Buffers", "Cached")):
        return m["MemFree"] + m["Buffers"] + m["Cached"]
    return None


def _mem_used(h: HostStats) -> int | None:
    avail = _mem_available(h)
    if avail is None or "MemTotal" not in h.meminfo:
        return None
    return h.meminfo["MemTotal"] - avail


def _swap_used(h: HostStats) -> int | None:
    m = h.meminfo
    if "SwapTotal" not in m or "SwapFree" not in m:
        return None
    return m["SwapTotal"] - m["SwapFree"]


def _sum(*values: int | None) -> int | None:
    if any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)


def _host_cpu_time(h: HostStats) -> str | None:
    t = h.cpu_ticks
    if not all(k in t for k in ("user", "nice", "system")):
        return None
    return "%f" % ((t["user"] + t["nice"] + t["system"]) / h.clock_ticks)


def _swapped_mib(h: HostStats, key: str) -> str | None:
    if key not in h.vmstat:
        return None
    return str(h.vmstat[key] * h.page_size // MIB)


def _page_rates(h: HostStats) -> str | None:
    if h.page_in_rate is None or h.page_fault_rate is None:
        return None
    return f"{h.page_in_rate},{h.page_fault_rate}"


def _vm_cpu_seconds(v: VmStats) -> str | None:
    # virsh dominfo prints "%.1lfs" of cpuTime / 1e9: the same digits.
    return None if v.cpu_time is None else "%.1f" % (v.cpu_time / 1e9)


def _host(
    name: str,
    kind: str,
    unit: str,
    meaning: str,
    needs: str,
    fn: Callable[[HostStats], str | None],
    variables: Tuple[str, ...] = (),
) -> Field:
    def value(snap: CycleStats) -> str | None:
        return fn(snap.host)

    return Field(name, "host", kind, unit, meaning, frozenset(needs.split()), host_value=value,
                 variables=variables)


def _vm(
    name: str, kind: str, unit: str, meaning: str, needs: str,
    fn: Callable[[VmStats], str | None],
) -> Field:
    return Field(name, "vm", kind, unit, meaning, frozenset(needs.split()), vm_value=fn)


def _dev(
    name: str, device: str, unit: str, meaning: str, needs: str,
    fn: Callable[[Device], str | None],
) -> Field:
    return Field(name, "vm", "int", unit, meaning, frozenset(needs.split()), device=device,
                 device_value=fn)


def _blk(attr: str) -> Callable[[Device], str | None]:
    def get(d: Device) -> str | None:
        return _i(getattr(d, attr, None)) if isinstance(d, BlockStats) else None

    return get


def _net(attr: str) -> Callable[[Device], str | None]:
    def get(d: Device) -> str | None:
        return _i(getattr(d, attr, None)) if isinstance(d, NetStats) else None

    return get


def _balloon(key: str) -> Callable[[VmStats], str | None]:
    def get(v: VmStats) -> str | None:
        return _i(v.balloon.get(key))

    return get


def _vcpu_time(d: Device) -> str | None:
    return _i(d.time) if isinstance(d, VcpuTime) else None


def _memory_stat(d: Device) -> str | None:
    return _i(d.value) if isinstance(d, MemoryStat) else None


_BALLOON_KEYS = (
    ("actual", "KiB", "balloon size the guest was asked for"),
    ("unused", "KiB", "memory the guest leaves unused"),
    ("available", "KiB", "memory the guest sees"),
    ("usable", "KiB", "memory the guest could use without swapping"),
    ("rss", "KiB", "resident memory of the VM's process on the host"),
    ("swap_in", "KiB", "memory the guest swapped in"),
    ("swap_out", "KiB", "memory the guest swapped out"),
    ("major_fault", "", "major page faults in the guest"),
    ("minor_fault", "", "minor page faults in the guest"),
    ("disk_caches", "KiB", "guest memory used for disk caches"),
    ("last_update", "s", "when the guest last updated its balloon statistics"),
    ("hugetlb_pgalloc", "", "huge pages the guest allocated successfully"),
    ("hugetlb_pgfail", "", "huge page allocations that failed in the guest"),
)
# A memory statistic libvirt reports under a key not listed above (newer
# libvirt, another driver) is still a field: vm.balloon.KEY, made on lookup.
_BALLOON_FIELD = re.compile(r"^vm\.balloon\.([a-z][a-z0-9_-]{0,63})$")

FIELDS: Tuple[Field, ...] = (
    # --- host: local --------------------------------------------------------
    _host("host.nodename", "string", "", "host name as hostname(1) prints it (uname nodename)",
          "local", lambda h: h.nodename),
    _host("host.nodename_short", "string", "", "host name up to the first dot (hostname -s)",
          "local", lambda h: None if h.nodename is None else h.nodename.split(".")[0]),
    _host("host.vendor", "string", "",
          "distribution vendor: os-release VENDOR_NAME, else NAME", "local", lambda h: h.vendor),
    Field("host.time", "host", "int", "s", "time of the cycle, seconds since the epoch (date +%s)",
          frozenset({"local"}), host_value=lambda s: str(int(s.wall))),
    # --- host: libvirt ------------------------------------------------------
    _host("host.hostname", "string", "", "host name as libvirt reports it (virsh hostname)",
          "libvirt", lambda h: h.hostname),
    _host("host.hypervisor_version", "string", "",
          "hypervisor driver and its version (virsh version: Running hypervisor)", "libvirt",
          lambda h: None if h.hypervisor is None or h.hypervisor_version is None
          else f"{h.hypervisor} {_version(h.hypervisor_version)}"),
    _host("host.libvirt_api", "string", "",
          "hypervisor driver and libvirt's version (virsh version: Using API)", "libvirt",
          lambda h: None if h.hypervisor is None or h.libvirt_version is None
          else f"{h.hypervisor} {_version(h.libvirt_version)}"),
    _host("host.cpus", "int", "", "logical CPUs of the node (virsh nodeinfo CPU(s))", "libvirt",
          lambda h: _i(h.cpus)),
    _host("host.memory_mib", "int", "MiB", "physical memory of the node (virsh nodeinfo)",
          "libvirt", lambda h: _i(h.node_memory_mib)),
    # --- host: /proc and /sys -------------------------------------------------
    _host("host.online_cpus", "int", "", "CPUs online (/sys/devices/system/cpu/online)", "sys",
          lambda h: _i(h.online_cpus)),
    _host("host.cpu_time", "real", "s",
          "user + nice + system time of all CPUs (/proc/stat), printf %f", "proc",
          _host_cpu_time),
    _host("host.mem_total_mib", "int", "MiB", "MemTotal", "proc",
          lambda h: _mib(h.meminfo.get("MemTotal"))),
    _host("host.mem_free_mib", "int", "MiB", "MemFree", "proc",
          lambda h: _mib(h.meminfo.get("MemFree"))),
    _host("host.mem_available_mib", "int", "MiB",
          "MemAvailable (free+buffers+cached before Linux 3.14)", "proc",
          lambda h: _mib(_mem_available(h))),
    _host("host.mem_used_mib", "int", "MiB", "MemTotal - MemAvailable (procps 4 'used')",
          "proc", lambda h: _mib(_mem_used(h))),
    _host("host.virtual_mem_free_mib", "int", "MiB", "MemFree + SwapFree", "proc",
          lambda h: _mib(_sum(h.meminfo.get("MemFree"), h.meminfo.get("SwapFree")))),
    _host("host.virtual_mem_used_mib", "int", "MiB",
          "MemTotal - MemAvailable + SwapTotal - SwapFree", "proc",
          lambda h: _mib(_sum(_mem_used(h), _swap_used(h)))),
    _host("host.pgpgin", "int", "KiB", "KiB paged in since boot (/proc/vmstat pgpgin)", "proc",
          lambda h: _i(h.vmstat.get("pgpgin"))),
    _host("host.pgpgout", "int", "KiB", "KiB paged out since boot (pgpgout)", "proc",
          lambda h: _i(h.vmstat.get("pgpgout"))),
    _host("host.pgfault", "int", "", "page faults since boot (pgfault)", "proc",
          lambda h: _i(h.vmstat.get("pgfault"))),
    _host("host.swapped_in_mib", "int", "MiB", "pswpin x page size since boot", "proc",
          lambda h: _swapped_mib(h, "pswpin")),
    _host("host.swapped_out_mib", "int", "MiB", "pswpout x page size since boot", "proc",
          lambda h: _swapped_mib(h, "pswpout")),
    _host("host.page_in_rate", "int", "KiB/s", "pgpgin per second since the previous cycle",
          "proc rates", lambda h: _i(h.page_in_rate)),
    _host("host.page_fault_rate", "int", "1/s", "pgfault per second since the previous cycle",
          "proc rates", lambda h: _i(h.page_fault_rate)),
    _host("host.page_rates", "group", "", "group: page_in_rate, page_fault_rate",
          "proc rates", _page_rates, variables=("page_in_rate", "page_fault_rate")),
    _host("host.load1", "real", "", "1-minute load average (/proc/loadavg)", "proc",
          lambda h: None if h.loadavg is None else f"{h.loadavg[0]:.2f}"),
    # --- vm -------------------------------------------------------------------
    _vm("vm.cpu_time", "real", "s", "CPU time of the VM, virsh dominfo's %.1f", "info",
        _vm_cpu_seconds),
    _vm("vm.cpu_time_ns", "int", "ns", "CPU time of the VM (all vCPUs and emulator)", "info",
        lambda v: _i(v.cpu_time)),
    _vm("vm.cpu_user_ns", "int", "ns", "user CPU time of the VM's process", "cpu_split",
        lambda v: _i(v.cpu_user)),
    _vm("vm.cpu_system_ns", "int", "ns", "system CPU time of the VM's process", "cpu_split",
        lambda v: _i(v.cpu_system)),
    _vm("vm.vcpus", "int", "", "current virtual CPUs (virsh dominfo CPU(s))", "info",
        lambda v: _i(v.vcpus)),
    _vm("vm.memory_max_kib", "int", "KiB", "maximum memory (nova's 'memory')", "info",
        lambda v: _i(v.memory_max)),
    _vm("vm.memory_max_mib", "int", "MiB", "maximum memory (virsh dominfo Max memory)", "info",
        lambda v: _mib(v.memory_max)),
    _vm("vm.memory_kib", "int", "KiB", "current memory, balloon included", "info",
        lambda v: _i(v.memory_current)),
    _vm("vm.memory_mib", "int", "MiB", "current memory (virsh dominfo Used memory)", "info",
        lambda v: _mib(v.memory_current)),
    *(
        _vm(f"vm.balloon.{key}", "int", unit, meaning + " (nova memory-" + key + ")",
            "balloon", _balloon(key))
        for key, unit, meaning in _BALLOON_KEYS
    ),
    _dev("vm.balloon", "memory", "", "every memory statistic libvirt reports, one metric per "
         "key (nova memory-KEY: name it memory-{dev})", "balloon", _memory_stat),
    _dev("vm.vcpu.time_ns", "vcpu", "ns", "CPU time of one vCPU (nova cpuN_time)", "vcpu",
         _vcpu_time),
    _dev("vm.disk.rd_req", "disk", "", "read requests (nova DEV_read_req)", "block",
         _blk("rd_req")),
    _dev("vm.disk.rd_bytes", "disk", "B", "bytes read (nova DEV_read)", "block",
         _blk("rd_bytes")),
    _dev("vm.disk.wr_req", "disk", "", "write requests (nova DEV_write_req)", "block",
         _blk("wr_req")),
    _dev("vm.disk.wr_bytes", "disk", "B", "bytes written (nova DEV_write)", "block",
         _blk("wr_bytes")),
    _dev("vm.disk.errors", "disk", "", "I/O errors (nova DEV_errors; not in bulk stats)",
         "block", _blk("errors")),
    *(
        _dev(f"vm.nic.{attr}", "nic", unit, f"{meaning} (nova DEV_{nova})", "net", _net(attr))
        for attr, unit, meaning, nova in (
            ("rx_bytes", "B", "bytes received", "rx"),
            ("rx_packets", "", "packets received", "rx_packets"),
            ("rx_errs", "", "receive errors", "rx_errors"),
            ("rx_drop", "", "received packets dropped", "rx_drop"),
            ("tx_bytes", "B", "bytes sent", "tx"),
            ("tx_packets", "", "packets sent", "tx_packets"),
            ("tx_errs", "", "send errors", "tx_errors"),
            ("tx_drop", "", "sent packets dropped", "tx_drop"),
        )
    ),
)

CATALOGUE: Mapping[str, Field] = {f.name: f for f in FIELDS}

# What the consumers of raw statistics read every cycle, whatever the metrics
# ask for: the history's derived values (CPU of the host and of each VM, disk
# and interface counters), the alarms (those, and the guest's free memory) and
# the accounting (interface byte counters). The daemon has the built-in source
# sample them in the same libvirt call as the cycle's built-in metrics.
COUNTER_FIELDS: Tuple[str, ...] = (
    "host.cpus",
    "host.cpu_time",
    "host.load1",
    "vm.cpu_time_ns",
    "vm.vcpus",
    "vm.balloon.unused",
    "vm.vcpu.time_ns",  # perfmon's per-vCPU cpuN (alarms)
    "vm.disk.rd_bytes",
    "vm.nic.rx_bytes",
)


def lookup(name: str) -> Field | None:
    """The field called NAME, or None (``vm.balloon.KEY`` exists for any KEY)."""
    field = CATALOGUE.get(name)
    if field is not None:
        return field
    match = _BALLOON_FIELD.match(name)
    if match is None:
        return None
    key = match.group(1).replace("-", "_")
    known = CATALOGUE.get(f"vm.balloon.{key}")
    if known is not None:
        return known
    return _vm(name, "int", "", f"libvirt memory statistic {key} (nova memory-{key})",
               "balloon", _balloon(key))


def known_fields(context: str | None = None) -> Sequence[str]:
    """Field names (of one context), in catalogue order."""
    return [f.name for f in FIELDS if context is None or f.context == context]


def devices(field: Field, vm: VmStats) -> Sequence[Tuple[str, Device]]:
    """(device name, record) for each device of FIELD's kind in VM, in the VM's order."""
    if field.device == "disk":
        return [(d.name, d) for d in vm.disks]
    if field.device == "nic":
        return [(n.name, n) for n in vm.nics]
    if field.device == "vcpu":
        return [(f"cpu{i}", VcpuTime(f"cpu{i}", t)) for i, t in enumerate(vm.vcpu_times)]
    if field.device == "memory":
        return [(k, MemoryStat(k, v)) for k, v in vm.balloon.items()]
    return []


def device_metric_name(template: str, device: str) -> str:
    """A per-device metric's name: ``{dev}`` in TEMPLATE replaced, else ``TEMPLATE.device``."""
    if "{dev}" in template:
        return template.replace("{dev}", device)
    return f"{template}.{device}"


def needs_of(names: Sequence[str]) -> FrozenSet[str]:
    """Everything the fields NAMES need read."""
    out: set[str] = set()
    for name in names:
        field = lookup(name)
        if field is not None:
            out |= field.needs
    return frozenset(out)


def needs_libvirt(names: Sequence[str]) -> bool:
    """Whether any of the fields NAMES is read from libvirt."""
    return bool(needs_of(names) & {"libvirt", *VM_GROUPS})


__all__: Sequence[str] = (
    "CATALOGUE",
    "COUNTER_FIELDS",
    "FIELDS",
    "Field",
    "MemoryStat",
    "VcpuTime",
    "device_metric_name",
    "devices",
    "known_fields",
    "lookup",
    "needs_libvirt",
    "needs_of",
)
