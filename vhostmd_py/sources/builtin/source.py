"""The built-in metric source: one CycleStats per cycle, values from the catalogue.

A cycle's built-in metrics are served by one ``collect_many`` call (the
collector groups requests by source): it reads only what the requested
fields need (/proc files on the loop, they are small local reads; libvirt in
a worker thread, bounded by ``timeout``), keeps the snapshot in
``last_snapshot`` for the consumers that come next (rates, history,
accounting), and formats each metric's raw value. A per-device field gives a
:class:`vhostmd_py.sources.base.PerDevice` value, one element per device.

A value that is not reported is left out, logged once per VM (or host) and
field; libvirt unreachable or too slow leaves the libvirt values out and
publishes the /proc ones.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Awaitable, Callable, Dict, FrozenSet, List, Sequence, Set, Tuple

from vhostmd_py.config import Config, MetricSpec
from vhostmd_py.errors import StrPath
from vhostmd_py.sources.base import PENDING, PerDevice, RawValue, Request, describe
from vhostmd_py.sources.builtin.catalogue import VM_GROUPS, Field, devices, lookup, needs_of
from vhostmd_py.sources.builtin.domstats import LibvirtStatsReader, NodeInfo
from vhostmd_py.sources.builtin.hostproc import HostProc
from vhostmd_py.sources.stats import CycleStats, HostStats, VmStats
from vhostmd_py.sources.vm import VM

log = logging.getLogger(__name__)

# Bound on one cycle's libvirt reads (the daemon's LIBVIRT_TIMEOUT).
DEFAULT_TIMEOUT = 5.0
# The shell action sampled /proc/vmstat one second apart: the first cycle does
# too, when the cycle's deadline leaves room for it (at least MIN_RATE_INTERVAL
# before it); otherwise the first rates are left out and the next cycle's come
# from this cycle's sample.
FIRST_RATE_INTERVAL = 1.0
MIN_RATE_INTERVAL = 0.2

RunBlocking = Callable[[Callable[[], Any]], Awaitable[Any]]


def is_builtin(metric: MetricSpec) -> bool:
    """Whether METRIC names a built-in source (routes it to NativeSource)."""
    return metric.source is not None


def config_needs_libvirt(config: Config) -> bool:
    """Whether CONFIG's built-in metrics read anything from libvirt."""
    names = [m.source for m in config.metrics if m.source is not None]
    return bool(needs_of(names) & {"libvirt", *VM_GROUPS})


async def _in_executor(fn: Callable[[], Any]) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn)


class NativeSource:
    """Built-in metrics; libvirt through CONNECTION (gives an open connection or None)."""

    # collect_many(requests, deadline=...) returns by the cycle's deadline.
    honours_deadline = True

    def __init__(
        self,
        *,
        connection: Callable[[], Any] | None = None,
        run_blocking: RunBlocking = _in_executor,
        timeout: float = DEFAULT_TIMEOUT,
        proc_root: StrPath = "/proc",
        sys_root: StrPath = "/sys",
        os_release: StrPath = "/etc/os-release",
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self._connection = connection
        self._run_blocking = run_blocking
        self.timeout = timeout
        self.proc = HostProc(proc_root=proc_root, sys_root=sys_root, os_release=os_release)
        self._clock = clock
        self._wall = wall
        self._sleep = sleep
        self.reader = LibvirtStatsReader()
        self._pending: asyncio.Future[Any] | None = None
        self._stuck = False
        self._prev_vmstat: Tuple[float, Dict[str, int]] | None = None
        self._missing_logged: Set[Tuple[str, str]] = set()
        self._clock_ticks = os.sysconf("SC_CLK_TCK")
        self._page_size = os.sysconf("SC_PAGE_SIZE")
        self.last_snapshot: CycleStats | None = None
        # Fields sampled every cycle whatever the metrics ask for: what the
        # consumers of raw statistics (the history) need, read in the same call.
        self.extra_fields: Tuple[str, ...] = ()
        # VMs sampled whatever the metrics ask for (the cycle's running VMs, for
        # the same consumers: host-only metrics must not leave them without VMs).
        self.extra_vms: Sequence[VM] = ()
        # Whether the last sample's libvirt read was still running at its deadline
        # (then its values are PENDING, not missing: the cycle carries them).
        self.libvirt_late = False

    # --- sampling ---------------------------------------------------------------

    async def sample(
        self, fields: Sequence[str], vms: Sequence[VM], *, deadline: float | None = None
    ) -> CycleStats:
        """Read what FIELDS need, for the host and VMS, into one CycleStats.

        DEADLINE (time.monotonic()): libvirt's answer is waited for until then
        at most (and never longer than the timeout); what is late is left out.
        """
        needs = needs_of(fields)
        self.libvirt_late = False
        groups = frozenset(needs & set(VM_GROUPS))
        want_static = "libvirt" in needs
        libvirt_job = None
        if (groups and vms) or want_static:
            libvirt_job = self._libvirt(
                lambda: self._read_libvirt(want_static, groups, vms), deadline
            )
        rates_job = self._rates(deadline) if "rates" in needs else None
        got = await asyncio.gather(
            libvirt_job if libvirt_job is not None else _none(),
            rates_job if rates_job is not None else _none(),
        )
        node, by_uuid = got[0] if got[0] is not None else (NodeInfo(), {})
        rates: Tuple[int | None, int | None] = got[1] if got[1] is not None else (None, None)
        host = self._host(needs, node, rates)
        snap = CycleStats(
            wall=self._wall(),
            mono=self._clock(),
            host=host,
            vms=tuple(by_uuid[vm.uuid] for vm in vms if vm.uuid in by_uuid),
        )
        self.last_snapshot = snap
        return snap

    def _read_libvirt(
        self, want_static: bool, groups: FrozenSet[str], vms: Sequence[VM]
    ) -> Tuple[NodeInfo, Dict[str, VmStats]]:
        # Runs in the worker thread.
        conn = self._connection() if self._connection is not None else None
        if conn is None:
            return NodeInfo(), {}
        node = self.reader.node(conn, want_static, want_static)
        return node, self.reader.domains(conn, groups, vms)

    async def _libvirt(self, fn: Callable[[], Any], deadline: float | None = None) -> Any:
        """fn() in the worker, or None when it fails or exceeds the timeout (logged once)."""
        if self._pending is not None:
            if not self._pending.done():
                self.libvirt_late = True
                return None  # still stuck in the previous cycle's call
            self._pending = None
        future = asyncio.ensure_future(self._run_blocking(fn))
        timeout = self.timeout
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - time.monotonic()))
        done, _ = await asyncio.wait({future}, timeout=timeout)
        if not done:
            self.libvirt_late = True
            self._pending = future
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            if not self._stuck:
                log.error("libvirt statistics took more than %.1f s: left out", self.timeout)
                self._stuck = True
            return None
        if self._stuck:
            log.info("libvirt statistics answer again")
            self._stuck = False
        try:
            return future.result()
        except Exception as err:  # a lost connection, a driver bug: VM values left out
            log.warning("reading libvirt statistics failed, VM values left out: %s", err)
            return None

    async def _rates(self, deadline: float | None = None) -> Tuple[int | None, int | None]:
        now, vmstat = self._clock(), self.proc.vmstat()
        prev = self._prev_vmstat
        if prev is None:
            # The baseline first: a cycle cancelled during the sleep leaves it
            # for the next one.
            self._prev_vmstat = prev = (now, vmstat)
            interval = FIRST_RATE_INTERVAL
            if deadline is not None:
                interval = min(interval, deadline - time.monotonic() - MIN_RATE_INTERVAL)
            if interval < MIN_RATE_INTERVAL:
                return None, None  # no room before the deadline: rates from the next cycle
            await self._sleep(interval)
            now, vmstat = self._clock(), self.proc.vmstat()
        self._prev_vmstat = (now, vmstat)
        elapsed = now - prev[0]

        def rate(key: str) -> int | None:
            if key not in vmstat or key not in prev[1] or elapsed <= 0:
                return None
            delta = vmstat[key] - prev[1][key]
            return int(delta / elapsed) if delta >= 0 else None

        return rate("pgpgin"), rate("pgfault")

    def _host(
        self, needs: FrozenSet[str], node: NodeInfo, rates: Tuple[int | None, int | None]
    ) -> HostStats:
        proc = "proc" in needs
        return HostStats(
            hostname=node.hostname,
            nodename=self.proc.nodename() if "local" in needs else None,
            vendor=self.proc.vendor() if "local" in needs else None,
            hypervisor=node.hypervisor,
            hypervisor_version=node.hypervisor_version,
            libvirt_version=node.libvirt_version,
            cpus=node.cpus,
            node_memory_mib=node.memory_mib,
            online_cpus=self.proc.online_cpus() if "sys" in needs else None,
            cpu_ticks=self.proc.cpu_ticks() if proc else {},
            clock_ticks=self._clock_ticks,
            meminfo=self.proc.meminfo() if proc else {},
            vmstat=self.proc.vmstat() if proc else {},
            loadavg=self.proc.loadavg() if proc else None,
            page_size=self._page_size,
            page_in_rate=rates[0],
            page_fault_rate=rates[1],
        )

    # --- values -------------------------------------------------------------------

    async def collect(self, metric: MetricSpec, vm: VM | None) -> RawValue:
        """One metric's value (a cycle uses collect_many)."""
        return (await self.collect_many([(metric, vm)]))[0]

    async def collect_many(
        self, requests: Sequence[Request], *, deadline: float | None = None
    ) -> List[RawValue]:
        """Sample once, then the raw value of each (metric, vm) of REQUESTS."""
        fields = sorted({m.source for m, _ in requests if m.source is not None}
                        | set(self.extra_fields))
        vms: List[VM] = []
        seen: Set[str] = set()
        for vm in (*self.extra_vms, *(vm for _, vm in requests)):
            if vm is not None and vm.uuid not in seen:
                seen.add(vm.uuid)
                vms.append(vm)
        snap = await self.sample(fields, vms, deadline=deadline)
        by_uuid = {v.uuid: v for v in snap.vms}
        self._missing_logged = {k for k in self._missing_logged if k[0] in seen or k[0] == ""}
        if not self.libvirt_late:
            return [self.value(snap, by_uuid, metric, vm) for metric, vm in requests]
        # libvirt's answer is late: its values are pending (the cycle carries
        # them), not missing, and their absence is not logged per VM.
        return [PENDING if self._from_libvirt(metric, vm) else self.value(snap, by_uuid, metric, vm)
                for metric, vm in requests]

    @staticmethod
    def _from_libvirt(metric: MetricSpec, vm: VM | None) -> bool:
        field = lookup(metric.source or "")
        return field is not None and (vm is not None or "libvirt" in field.needs)

    def value(
        self, snap: CycleStats, by_uuid: Dict[str, VmStats], metric: MetricSpec, vm: VM | None
    ) -> RawValue:
        """METRIC's raw value for VM (None: host) from SNAP; None when not reported."""
        field = lookup(metric.source or "")
        if field is None:  # config.py refuses unknown fields; a stale MetricSpec only
            return None
        if vm is None:
            text = field.host_value(snap) if field.host_value is not None else None
            return self._present(text, metric, None, field)
        stats = by_uuid.get(vm.uuid)
        if stats is None:
            self._missing(metric, vm, field, "no statistics for this VM")
            return None
        if field.device is not None:
            return self._per_device(field, stats)
        text = field.vm_value(stats) if field.vm_value is not None else None
        return self._present(text, metric, vm, field)

    def _per_device(self, field: Field, stats: VmStats) -> PerDevice:
        out = []
        for name, dev in devices(field, stats):
            text = field.device_value(dev) if field.device_value is not None else None
            if text is not None:
                out.append((name, text.encode("utf-8")))
        return PerDevice(tuple(out))

    def _present(
        self, text: str | None, metric: MetricSpec, vm: VM | None, field: Field
    ) -> RawValue:
        if text is None:
            self._missing(metric, vm, field, "not reported")
            return None
        return text.encode("utf-8")

    def _missing(self, metric: MetricSpec, vm: VM | None, field: Field, why: str) -> None:
        key = ("" if vm is None else vm.uuid, field.name)
        if key in self._missing_logged:
            log.debug("%s: %s: %s", describe(metric, vm), field.name, why)
            return
        self._missing_logged.add(key)
        log.warning("%s left out: built-in source %s: %s", describe(metric, vm), field.name, why)


async def _none() -> None:
    return None
