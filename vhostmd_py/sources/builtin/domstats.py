"""Per-VM and node statistics from libvirt-python: one bulk call, or per-domain calls.

Blocking (libvirt-python is): the caller runs :meth:`LibvirtStatsReader.read`
off the event loop, with a bound on time. ``libvirt`` is imported lazily.

Which path: ``virConnectGetAllDomainStats`` (one RPC for every running domain)
is tried once per connection. VIR_ERR_NO_SUPPORT turns it off for that
connection. A driver may also answer it with fewer groups than asked (the
test driver gives only ``state.*``): a group that no domain's record has on
the first cycle with domains is read with per-domain calls from then on, for
that connection (``info``, ``getCPUStats``, ``memoryStats``, ``vcpus``,
``blockStats``/``interfaceStats`` on the devices of the domain XML, as nova's
get_diagnostics does). A per-domain call the driver does not support is
dropped for the connection (logged once); one that fails for a domain leaves
that domain's group out this cycle (logged once per domain and call).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Sequence, Set, Tuple, TypeVar

from lxml import etree

from vhostmd_py.safexml import safe_parser
from vhostmd_py.sources.stats import BlockStats, NetStats, VmStats
from vhostmd_py.sources.vm import VM

log = logging.getLogger(__name__)

T = TypeVar("T")

# Bulk stats group flag name (libvirt.VIR_DOMAIN_STATS_*) and the record key
# whose presence says the driver really reports the group.
_BULK = {
    "info": ("VIR_DOMAIN_STATS_CPU_TOTAL", "cpu.time"),
    "cpu_split": ("VIR_DOMAIN_STATS_CPU_TOTAL", "cpu.user"),
    "balloon": ("VIR_DOMAIN_STATS_BALLOON", "balloon.current"),
    "vcpu": ("VIR_DOMAIN_STATS_VCPU", "vcpu.current"),
    "block": ("VIR_DOMAIN_STATS_BLOCK", "block.count"),
    "net": ("VIR_DOMAIN_STATS_INTERFACE", "net.count"),
}
# "info" also needs the vCPU count and the memory sizes from bulk.
_INFO_EXTRA = ("VIR_DOMAIN_STATS_STATE", "VIR_DOMAIN_STATS_VCPU", "VIR_DOMAIN_STATS_BALLOON")


@dataclass(frozen=True)
class NodeInfo:
    """What libvirt says about the host."""

    hostname: str | None = None
    hypervisor: str | None = None
    hypervisor_version: int | None = None
    libvirt_version: int | None = None
    cpus: int | None = None
    memory_mib: int | None = None


def devices_from_xml(xml: str) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(disk targets, interface targets) of a domain XML, in document order (as nova)."""
    try:
        root = etree.fromstring(xml.encode("utf-8"), safe_parser())
    except etree.XMLSyntaxError:
        return (), ()
    disks = tuple(str(t.get("dev")) for t in root.iterfind("devices/disk/target") if t.get("dev"))
    nics = tuple(
        str(t.get("dev")) for t in root.iterfind("devices/interface/target") if t.get("dev")
    )
    return disks, nics


def _int(rec: Dict[str, Any], key: str) -> int | None:
    value = rec.get(key)
    return int(value) if isinstance(value, (int, float)) else None


def _bulk_vcpu_times(rec: Dict[str, Any]) -> Tuple[int, ...]:
    times: List[int] = []
    while True:
        value = _int(rec, f"vcpu.{len(times)}.time")
        if value is None:
            return tuple(times)
        times.append(value)


def _bulk_disks(rec: Dict[str, Any]) -> Tuple[BlockStats, ...]:
    out = []
    for i in range(_int(rec, "block.count") or 0):
        p = f"block.{i}."
        name = rec.get(p + "name")
        if not isinstance(name, str):
            continue
        out.append(BlockStats(
            name=name, rd_req=_int(rec, p + "rd.reqs"), rd_bytes=_int(rec, p + "rd.bytes"),
            wr_req=_int(rec, p + "wr.reqs"), wr_bytes=_int(rec, p + "wr.bytes"),
            errors=_int(rec, p + "errors"), capacity=_int(rec, p + "capacity"),
            allocation=_int(rec, p + "allocation"),
        ))
    return tuple(out)


def _bulk_nics(rec: Dict[str, Any]) -> Tuple[NetStats, ...]:
    out = []
    for i in range(_int(rec, "net.count") or 0):
        p = f"net.{i}."
        name = rec.get(p + "name")
        if not isinstance(name, str):
            continue
        out.append(NetStats(
            name=name,
            rx_bytes=_int(rec, p + "rx.bytes"), rx_packets=_int(rec, p + "rx.pkts"),
            rx_errs=_int(rec, p + "rx.errs"), rx_drop=_int(rec, p + "rx.drop"),
            tx_bytes=_int(rec, p + "tx.bytes"), tx_packets=_int(rec, p + "tx.pkts"),
            tx_errs=_int(rec, p + "tx.errs"), tx_drop=_int(rec, p + "tx.drop"),
        ))
    return tuple(out)


def _bulk_balloon(rec: Dict[str, Any]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for key, value in rec.items():
        skip = ("balloon.current", "balloon.maximum")
        if key.startswith("balloon.") and key not in skip and isinstance(value, int):
            out[key[len("balloon."):].replace("-", "_")] = value
    return out


class LibvirtStatsReader:
    """Reads node and domain statistics; remembers per connection what the driver answers."""

    def __init__(self) -> None:
        self._libvirt: Any = None
        self._conn: Any = None
        self._bulk: bool | None = None  # None: not tried on this connection
        self._bulk_groups: Dict[str, bool] = {}  # group -> served by the bulk call
        self._unsupported: Set[str] = set()  # per-domain calls the driver refuses
        self._node_static: NodeInfo | None = None
        self._devices: Dict[Tuple[int, str], Tuple[Tuple[str, ...], Tuple[str, ...]]] = {}
        self._logged: Set[Tuple[str, str]] = set()

    def _module(self) -> Any:
        if self._libvirt is None:
            from vhostmd_py.libvirt_host import import_libvirt

            self._libvirt = import_libvirt()
        return self._libvirt

    def _reset_for(self, conn: Any) -> None:
        if conn is not self._conn:
            # A new connection (libvirtd restarted, maybe upgraded): ask again.
            self._conn = conn
            self._bulk = None
            self._bulk_groups = {}
            self._unsupported = set()
            self._node_static = None
            self._devices = {}

    @property
    def bulk_groups(self) -> Dict[str, bool]:
        """Which groups the bulk call serves on the current connection (for tests, logs)."""
        return dict(self._bulk_groups)

    # --- node ------------------------------------------------------------------

    def node(self, conn: Any, want_static: bool, want_info: bool) -> NodeInfo:
        """Host name, driver, versions (once per connection) and node info (every call)."""
        self._reset_for(conn)
        libvirt = self._module()
        static = self._node_static
        if want_static and static is None:
            try:
                static = NodeInfo(
                    hostname=conn.getHostname(), hypervisor=conn.getType(),
                    hypervisor_version=conn.getVersion(), libvirt_version=conn.getLibVersion(),
                )
                self._node_static = static
            except libvirt.libvirtError as err:
                self._once("host", "node", "cannot read host name, driver and version: %s", err)
        cpus = memory = None
        if want_info:
            try:
                info = conn.getInfo()
                memory, cpus = int(info[1]), int(info[2])
            except libvirt.libvirtError as err:
                self._once("host", "nodeinfo", "cannot read node info: %s", err)
        s = static or NodeInfo()
        return NodeInfo(s.hostname, s.hypervisor, s.hypervisor_version, s.libvirt_version,
                        cpus, memory)

    # --- domains ---------------------------------------------------------------

    def domains(self, conn: Any, groups: FrozenSet[str], vms: Sequence[VM]) -> Dict[str, VmStats]:
        """VmStats by UUID for VMS (those still running), reading only GROUPS."""
        self._reset_for(conn)
        libvirt = self._module()
        wanted = {vm.uuid: vm for vm in vms}
        self._logged = {k for k in self._logged if k[0] in wanted or k[0] == "host"}
        if not groups or not wanted:
            return {}
        records: Dict[str, Dict[str, Any]] = {}
        doms: Dict[str, Any] = {}
        bulk_groups = [g for g in groups if self._bulk_groups.get(g, True)]
        if self._bulk is not False and bulk_groups:
            flags = 0
            for g in bulk_groups:
                flags |= getattr(libvirt, _BULK[g][0])
                if g == "info":
                    for extra in _INFO_EXTRA:
                        flags |= getattr(libvirt, extra)
            try:
                got = conn.getAllDomainStats(
                    stats=flags, flags=libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
                )
                self._bulk = True
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
                log.info("libvirt driver has no bulk domain statistics: per-domain calls")
                self._bulk = False
                got = []
            for dom, rec in got:
                uuid = dom.UUIDString()
                if uuid in wanted:
                    records[uuid], doms[uuid] = rec, dom
            if got:
                for g in bulk_groups:
                    if g not in self._bulk_groups:
                        probe = _BULK[g][1]
                        served = any(probe in r for _, r in got)
                        self._bulk_groups[g] = served
                        log.info("libvirt statistics group %s: %s", g,
                                 "bulk call" if served else "per-domain calls")
        per_domain = {g for g in groups if not self._bulk_groups.get(g, False)}
        if per_domain and len(doms) < len(wanted):
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                uuid = dom.UUIDString()
                if uuid in wanted and uuid not in doms:
                    doms[uuid] = dom
        out: Dict[str, VmStats] = {}
        for uuid, vm in wanted.items():
            dom = doms.get(uuid)
            if dom is None:
                continue  # stopped since it was listed: its metrics are left out
            rec = records.get(uuid, {})
            stats = self._from_bulk(vm, rec, groups) if rec else VmStats(vm.uuid, vm.name, vm.id)
            if per_domain:
                stats = self._per_domain(vm, dom, stats, per_domain)
            out[uuid] = stats
        return out

    def _from_bulk(self, vm: VM, rec: Dict[str, Any], groups: FrozenSet[str]) -> VmStats:
        served = {g for g in groups if self._bulk_groups.get(g)}
        kw: Dict[str, Any] = {"state": _int(rec, "state.state")}
        if "info" in served:
            kw.update(cpu_time=_int(rec, "cpu.time"), vcpus=_int(rec, "vcpu.current"),
                      max_vcpus=_int(rec, "vcpu.maximum"),
                      memory_max=_int(rec, "balloon.maximum"),
                      memory_current=_int(rec, "balloon.current"))
        if "cpu_split" in served:
            kw.update(cpu_user=_int(rec, "cpu.user"), cpu_system=_int(rec, "cpu.system"))
        if "balloon" in served:
            kw["balloon"] = _bulk_balloon(rec)
        if "vcpu" in served:
            kw["vcpu_times"] = _bulk_vcpu_times(rec)
        if "block" in served:
            kw["disks"] = _bulk_disks(rec)
        if "net" in served:
            kw["nics"] = _bulk_nics(rec)
        return VmStats(vm.uuid, vm.name, vm.id, **kw)

    def _once(self, key: str, what: str, msg: str, *args: Any) -> None:
        if (key, what) not in self._logged:
            self._logged.add((key, what))
            log.warning(msg, *args)

    def _call(self, vm: VM, what: str, fn: Callable[..., T], *args: Any) -> T | None:
        """fn(*args); None (logged once per VM and call) when the driver refuses it."""
        if what in self._unsupported:
            return None
        libvirt = self._module()
        try:
            return fn(*args)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
                self._unsupported.add(what)
                log.info("libvirt driver does not support %s: its values are left out", what)
            else:
                self._once(vm.uuid, what, "%s of VM %r (id %d) failed, its values are left "
                           "out: %s", what, vm.name, vm.id, err)
            return None

    def _device_names(self, vm: VM, dom: Any) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
        key = (vm.id, vm.uuid)
        if key not in self._devices:
            xml = self._call(vm, "XMLDesc", dom.XMLDesc, 0)
            if xml is None:
                return (), ()
            self._devices[key] = devices_from_xml(xml)
            if len(self._devices) > 4 * 4096:  # bound the cache across VM churn
                self._devices = {key: self._devices[key]}
        return self._devices[key]

    def _per_domain(self, vm: VM, dom: Any, s: VmStats, groups: Set[str]) -> VmStats:
        kw: Dict[str, Any] = {}
        if "info" in groups:
            info = self._call(vm, "virDomainGetInfo", dom.info)
            if info is not None:
                kw.update(state=int(info[0]), memory_max=int(info[1]),
                          memory_current=int(info[2]), vcpus=int(info[3]),
                          cpu_time=int(info[4]))
        if "cpu_split" in groups:
            cpu = self._call(vm, "virDomainGetCPUStats", dom.getCPUStats, True)
            if cpu:
                kw.update(cpu_user=cpu[0].get("user_time"), cpu_system=cpu[0].get("system_time"))
        if "balloon" in groups:
            mem = self._call(vm, "virDomainMemoryStats", dom.memoryStats)
            if mem is not None:
                kw["balloon"] = {k.replace("-", "_"): int(v) for k, v in mem.items()}
        if "vcpu" in groups:
            vcpus = self._call(vm, "virDomainGetVcpus", dom.vcpus)
            if vcpus is not None:
                kw["vcpu_times"] = tuple(int(v[2]) for v in sorted(vcpus[0]))
        if "block" in groups or "net" in groups:
            disks, nics = self._device_names(vm, dom)
            if "block" in groups:
                blocks = []
                for dev in disks:
                    st = self._call(vm, f"virDomainBlockStats({dev})", dom.blockStats, dev)
                    if st is not None:
                        blocks.append(BlockStats(dev, *(int(x) for x in st[:5])))
                kw["disks"] = tuple(blocks)
            if "net" in groups:
                out = []
                for dev in nics:
                    st = self._call(vm, f"virDomainInterfaceStats({dev})", dom.interfaceStats,
                                    dev)
                    if st is not None:
                        out.append(NetStats(dev, *(int(x) for x in st[:8])))
                kw["nics"] = tuple(out)
        if not kw:
            return s
        from dataclasses import replace

        return replace(s, **kw)
