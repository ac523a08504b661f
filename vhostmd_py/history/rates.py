"""Derived values of one cycle: CPU % and per-second rates, pure and deterministic.

Input: the previous cycle's counter state (a :class:`CounterBook`) and the
current :class:`~vhostmd_py.sources.stats.CycleStats`; output: a frozen
:class:`DerivedValues` and the new counter state. Nothing here reads a clock,
a file or a global: the same inputs always give the same outputs.

Every counter goes through ONE function, :func:`advance`, with RRD's
COUNTER/DERIVE semantics made safe:

- the first sample of a counter gives no value (``reason="first"``);
- a counter that goes down (VM restarted, device replaced, 32/64-bit wrap)
  starts a new baseline and gives no value (``"reset"``): a wrap and a reset
  cannot be told apart, and a guessed wrap is how spikes are made;
- a gap longer than the heartbeat gives no value (``"gap"``), as does a clock
  that did not move forward (``"clock"``);
- a rate above the counter's plausible maximum gives no value (``"absurd"``)
  and starts a new baseline;
- a counter the source did not report gives no value and forgets the baseline
  (``"absent"``), so a value that comes back is a first sample again.

A VM's counters are keyed by (uuid, libvirt id): a VM that was restarted
between two cycles gets a new id, so all its counters start a new baseline
even when the new values happen to be larger than the old ones.

Rates are per second over the monotonic clock (``CycleStats.mono``). CPU %
of a VM is nova's ``100 * dcpu_time / (dt * vcpus * 1e9)`` capped at 100 (so
100 means every vCPU busy); the host's is the busy share of /proc/stat's ticks
(``100 * dbusy / dtotal``, busy = everything but idle and iowait; guest time
is already counted in user/nice and is not added twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, Mapping, NamedTuple, Sequence, Tuple

from vhostmd_py.sources.stats import BlockStats, CycleStats, HostStats, NetStats, VmStats

NS_PER_S = 1_000_000_000

# Plausibility limits of a rate (per second), above which a delta is treated
# as a counter reset rather than reported: 100 GB/s per device is 800 Gbit/s,
# more than any NIC or disk of this decade; 1e9 packets or requests per second
# likewise. They exist to catch a replaced device whose counter jumped up.
MAX_BYTES_RATE = 1e11
MAX_OPS_RATE = 1e9

# /proc/stat fields that are part of the total (guest and guest_nice are
# already inside user and nice).
_HOST_TOTAL_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_HOST_IDLE_FIELDS = ("idle", "iowait")


class Counter(NamedTuple):
    """The baseline of one counter: its last value and when it was read (monotonic s)."""

    value: int
    mono: float


class Step(NamedTuple):
    """What one new sample of a counter gave.

    ``delta``/``dt`` are set only when the sample yields a value; ``reason``
    says why not otherwise (first, reset, gap, clock, absurd, absent).
    (Named tuples, not dataclasses: there are tens of thousands per cycle.)
    """

    state: Counter | None
    delta: int | None = None
    dt: float | None = None
    reason: str | None = None

    @property
    def rate(self) -> float | None:
        """The delta per second, or None."""
        if self.delta is None or self.dt is None:
            return None
        return self.delta / self.dt


def advance(
    prev: Counter | None,
    value: int | None,
    mono: float,
    *,
    heartbeat: float,
    max_rate: float | None = None,
) -> Step:
    """THE counter semantics (see the module docstring): a new sample against a baseline."""
    if value is None:
        return Step(None, reason="absent")
    new = Counter(value, mono)
    if prev is None:
        return Step(new, reason="first")
    dt = mono - prev.mono
    if dt <= 0:
        return Step(new, reason="clock")
    if dt > heartbeat:
        return Step(new, reason="gap")
    delta = value - prev.value
    if delta < 0:
        return Step(new, reason="reset")
    if max_rate is not None and delta > max_rate * dt:
        return Step(new, reason="absurd")
    return Step(new, delta=delta, dt=dt)


CounterKey = Tuple[Hashable, ...]


@dataclass(frozen=True)
class CounterBook:
    """Every counter's baseline, keyed by a tuple; immutable (each cycle makes a new one)."""

    counters: Mapping[CounterKey, Counter]

    @classmethod
    def empty(cls) -> CounterBook:
        """No baselines: every counter's next sample is a first sample."""
        return cls({})

    def __len__(self) -> int:
        return len(self.counters)


class _Stepper:
    """Applies :func:`advance` to keyed counters, building the next book (internal)."""

    def __init__(self, book: CounterBook, mono: float, heartbeat: float) -> None:
        self.old = book.counters
        self.new: Dict[CounterKey, Counter] = {}
        self.mono = mono
        self.heartbeat = heartbeat

    def step(self, key: CounterKey, value: int | None, max_rate: float | None = None) -> Step:
        result = advance(
            self.old.get(key), value, self.mono, heartbeat=self.heartbeat, max_rate=max_rate
        )
        if result.state is not None:
            self.new[key] = result.state
        return result

    def rate(self, key: CounterKey, value: int | None, max_rate: float | None) -> float | None:
        return self.step(key, value, max_rate).rate


# --- the derived record ----------------------------------------------------------


@dataclass(frozen=True)
class NicRates:
    """One interface's rates per second (None: unknown this cycle)."""

    name: str
    rx_bytes: float | None
    tx_bytes: float | None
    rx_packets: float | None
    tx_packets: float | None


@dataclass(frozen=True)
class DiskRates:
    """One disk's rates per second (None: unknown this cycle)."""

    name: str
    rd_bytes: float | None
    wr_bytes: float | None
    rd_req: float | None
    wr_req: float | None


@dataclass(frozen=True)
class VmRates:
    """One VM's derived values; totals are None unless every device's value is known."""

    uuid: str
    name: str
    id: int
    cpu_pct: float | None
    nics: Tuple[NicRates, ...] = ()
    disks: Tuple[DiskRates, ...] = ()
    net_rx_bytes: float | None = None
    net_tx_bytes: float | None = None
    net_rx_packets: float | None = None
    net_tx_packets: float | None = None
    disk_rd_bytes: float | None = None
    disk_wr_bytes: float | None = None
    disk_rd_req: float | None = None
    disk_wr_req: float | None = None


@dataclass(frozen=True)
class HostRates:
    """The host's derived values (percentages of all CPUs' time; gauges as read)."""

    cpu_pct: float | None = None
    iowait_pct: float | None = None
    steal_pct: float | None = None
    load1: float | None = None
    mem_used_pct: float | None = None


@dataclass(frozen=True)
class DerivedValues:
    """One cycle's derived values: the host and every VM of the snapshot, in its order."""

    wall: float
    mono: float
    host: HostRates
    vms: Tuple[VmRates, ...] = ()

    def vm(self, uuid: str) -> VmRates | None:
        """The VM with this UUID, or None."""
        for vm in self.vms:
            if vm.uuid == uuid:
                return vm
        return None


# --- computing it ------------------------------------------------------------------


def _total(values: Sequence[float | None]) -> float | None:
    """Sum over devices; unknown when there is none or any one is unknown."""
    if not values or any(v is None for v in values):
        return None
    return float(sum(v for v in values if v is not None))


def _cap_pct(value: float) -> float:
    return min(max(value, 0.0), 100.0)


def _host(stepper: _Stepper, host: HostStats) -> HostRates:
    ticks = host.cpu_ticks
    total_v = busy_v = iowait_v = steal_v = None
    if ticks and all(f in ticks for f in ("user", "system", "idle")):
        total_v = sum(ticks.get(f, 0) for f in _HOST_TOTAL_FIELDS)
        busy_v = total_v - sum(ticks.get(f, 0) for f in _HOST_IDLE_FIELDS)
        iowait_v = ticks.get("iowait")
        steal_v = ticks.get("steal")
    # Ticks per second across all CPUs bound the plausible rate of each sum.
    tick_limit = float(host.clock_ticks * host.cpus * 2) if host.cpus else None
    total = stepper.step(("host", "cpu_total"), total_v, tick_limit)
    busy = stepper.step(("host", "cpu_busy"), busy_v, tick_limit)
    iowait = stepper.step(("host", "cpu_iowait"), iowait_v, tick_limit)
    steal = stepper.step(("host", "cpu_steal"), steal_v, tick_limit)

    def share(part: Step) -> float | None:
        if part.delta is None or total.delta is None or total.delta <= 0:
            return None
        return _cap_pct(100.0 * part.delta / total.delta)

    mem_used = None
    mem_total = host.meminfo.get("MemTotal")
    mem_avail = host.meminfo.get("MemAvailable")
    if mem_total and mem_avail is not None:
        mem_used = _cap_pct(100.0 * (mem_total - mem_avail) / mem_total)
    return HostRates(
        cpu_pct=share(busy),
        iowait_pct=share(iowait),
        steal_pct=share(steal),
        load1=host.loadavg[0] if host.loadavg is not None else None,
        mem_used_pct=mem_used,
    )


def _nic(stepper: _Stepper, base: CounterKey, nic: NetStats) -> NicRates:
    key = (*base, "nic", nic.name)
    return NicRates(
        name=nic.name,
        rx_bytes=stepper.rate((*key, "rx_bytes"), nic.rx_bytes, MAX_BYTES_RATE),
        tx_bytes=stepper.rate((*key, "tx_bytes"), nic.tx_bytes, MAX_BYTES_RATE),
        rx_packets=stepper.rate((*key, "rx_packets"), nic.rx_packets, MAX_OPS_RATE),
        tx_packets=stepper.rate((*key, "tx_packets"), nic.tx_packets, MAX_OPS_RATE),
    )


def _disk(stepper: _Stepper, base: CounterKey, disk: BlockStats) -> DiskRates:
    key = (*base, "disk", disk.name)
    return DiskRates(
        name=disk.name,
        rd_bytes=stepper.rate((*key, "rd_bytes"), disk.rd_bytes, MAX_BYTES_RATE),
        wr_bytes=stepper.rate((*key, "wr_bytes"), disk.wr_bytes, MAX_BYTES_RATE),
        rd_req=stepper.rate((*key, "rd_req"), disk.rd_req, MAX_OPS_RATE),
        wr_req=stepper.rate((*key, "wr_req"), disk.wr_req, MAX_OPS_RATE),
    )


def _vm(stepper: _Stepper, vm: VmStats) -> VmRates:
    base: CounterKey = ("vm", vm.uuid, vm.id)
    # The cap at 100 % makes an over-large delta harmless; no extra limit.
    cpu = stepper.step((*base, "cpu_time"), vm.cpu_time)
    cpu_pct = None
    if cpu.delta is not None and cpu.dt is not None and vm.vcpus:
        cpu_pct = _cap_pct(100.0 * cpu.delta / (cpu.dt * vm.vcpus * NS_PER_S))
    nics = tuple(_nic(stepper, base, n) for n in vm.nics)
    disks = tuple(_disk(stepper, base, d) for d in vm.disks)
    return VmRates(
        uuid=vm.uuid,
        name=vm.name,
        id=vm.id,
        cpu_pct=cpu_pct,
        nics=nics,
        disks=disks,
        net_rx_bytes=_total([n.rx_bytes for n in nics]),
        net_tx_bytes=_total([n.tx_bytes for n in nics]),
        net_rx_packets=_total([n.rx_packets for n in nics]),
        net_tx_packets=_total([n.tx_packets for n in nics]),
        disk_rd_bytes=_total([d.rd_bytes for d in disks]),
        disk_wr_bytes=_total([d.wr_bytes for d in disks]),
        disk_rd_req=_total([d.rd_req for d in disks]),
        disk_wr_req=_total([d.wr_req for d in disks]),
    )


def derive(
    book: CounterBook, snapshot: CycleStats, *, heartbeat: float
) -> Tuple[DerivedValues, CounterBook]:
    """This cycle's derived values and the counter state for the next cycle.

    The new book holds only counters present in this snapshot: a VM or device
    that disappeared is forgotten, and is a first sample if it comes back.
    """
    stepper = _Stepper(book, snapshot.mono, heartbeat)
    host = _host(stepper, snapshot.host)
    vms = tuple(_vm(stepper, vm) for vm in snapshot.vms)
    return DerivedValues(snapshot.wall, snapshot.mono, host, vms), CounterBook(stepper.new)
