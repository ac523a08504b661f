"""Per-VM network accounting per period, budgets, and enforcement (PlanetLab bwmon, better).

Per VM and per interface, the bytes sent (tx) and received (rx) during the
current period are the sum of the counter increments observed since the
period's start. Periods are aligned: they start at ``period_offset + k *
period`` seconds since the epoch (default: every day at 00:00 UTC).

Counting rule (what bwmon gets wrong: it starts a new period, forgetting the
usage, whenever a counter goes down):

* an increment is counted in the period of the sample that observes it;
* a counter that went down (VM restarted, NIC unplugged and plugged again,
  a 32-bit wrap) restarted from 0: the new value is what was sent since, so
  it is added; the usage so far is kept. Usage never decreases;
* a counter is also known to have restarted when the domain's ID changed
  (the VM was restarted, even while the daemon was down) or the host's boot
  id changed (a reboot resets every counter): then the new value counts from
  0 too, even if it is above the stored one;
* the first value of a VM never seen before is a baseline (not counted):
  what it sent before we saw it cannot be placed in a period. A NIC that
  appears on a known VM (hot-plug) counts from 0;
* a restarted daemon continues from the state file: the increment since the
  last write is counted once, by the next sample (after kill -9 too).

The state (``accounting.json`` in the state directory) is written atomically
after every cycle (statefile.py). At a period's end the totals move to
``previous``, usage starts at 0 from the last counter values, caps are lifted
and VMs not running any more are dropped.

Budgets: when a VM's tx (or rx) usage reaches its budget an alarm is raised
once per period. With ``enforce="yes"`` its outbound rate is capped through
libvirt (the budget's average rate, split evenly over its interfaces; only
what exceeds it changes, see :func:`cap_params`) until the period ends; the
parameters found are written to the state file *before* anything changes, so
a crash between cap and restore still restores exactly them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Protocol, TypeVar

from vhostmd_py.config import AccountingConfig, Budget
from vhostmd_py.errors import LibvirtError, ShapingError, StateFileError, StrPath
from vhostmd_py.fs import read_json, write_json_atomic
from vhostmd_py.libvirt_host import Host
from vhostmd_py.monitors.alarms import Alarm, GuestMetric
from vhostmd_py.sources.stats import CycleStats

log = logging.getLogger(__name__)
T = TypeVar("T")

ACCOUNTING_FILE = "accounting.json"
STATE_VERSION = 1
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"

# Guest metrics (opt-in, <accounting guest_metrics="yes">), for that VM only.
GUEST_TX_BYTES = "AccountingTxBytes"  # uint64 bytes sent this period
GUEST_RX_BYTES = "AccountingRxBytes"  # uint64 bytes received this period
GUEST_TX_BUDGET = "AccountingTxBudget"  # uint64 bytes, 0 = no budget
GUEST_RX_BUDGET = "AccountingRxBudget"  # uint64 bytes, 0 = no budget
GUEST_PERIOD_END = "AccountingPeriodEnd"  # uint64 seconds since the epoch
GUEST_CAPPED = "AccountingCapped"  # uint32 1 when the outbound rate is capped

# The keys of virDomainSetInterfaceParameters we change (and restore).
OUTBOUND_KEYS = ("outbound.average", "outbound.peak", "outbound.burst")


class Shaper(Protocol):
    """Reads and sets a VM interface's bandwidth parameters (virsh domiftune)."""

    def get(self, uuid: str, dev: str) -> Dict[str, int]:
        """The interface's parameters as libvirt reports them."""

    def set(self, uuid: str, dev: str, params: Dict[str, int]) -> None:
        """Change some of them."""


class LibvirtShaper:
    """Shaper over libvirt: the read-write connection of the daemon's libvirt Host.

    HOST (vhostmd_py.libvirt_host.Host) opens it on first use; by default a
    Host of its own for URI. CONN: an already open connection (tests).
    """

    def __init__(self, uri: str | None, *, flags: int | None = None, conn: Any = None,
                 host: Host | None = None) -> None:
        self.uri = uri
        # Default VIR_DOMAIN_AFFECT_CURRENT: the live domain when it runs, else its config.
        self.flags = 0 if flags is None else flags
        self._conn = conn
        self._own_host = host is None
        self.host = host if host is not None else Host(uri)

    def _connection(self) -> Any:
        if self._conn is not None and self._conn.isAlive():
            return self._conn
        self._conn = None
        return self.host.read_write()

    def _domain(self, uuid: str, dev: str) -> Any:
        try:
            conn = self._connection()
            try:
                return conn.lookupByUUIDString(uuid)
            except Exception as err:
                if self.host.is_error(err):
                    raise self.host.error(err) from err
                raise
        except LibvirtError as err:
            gone = self.host.is_error(err, "VIR_ERR_NO_DOMAIN")
            if not gone:
                self._conn = None
                self.host.drop_read_write()
            raise ShapingError(uuid, dev, err.reason, gone=gone) from err

    def _call(self, uuid: str, dev: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except Exception as err:
            if self.host.is_error(err):
                raise ShapingError(uuid, dev, str(err)) from err
            raise

    def get(self, uuid: str, dev: str) -> Dict[str, int]:
        """The interface's parameters (``dom.interfaceParameters``)."""
        dom = self._domain(uuid, dev)
        found = self._call(uuid, dev, dom.interfaceParameters, dev, self.flags)
        return {str(k): int(v) for k, v in found.items()}

    def set(self, uuid: str, dev: str, params: Dict[str, int]) -> None:
        """Change parameters (``dom.setInterfaceParameters``, as ``virsh domiftune``)."""
        dom = self._domain(uuid, dev)
        self._call(uuid, dev, dom.setInterfaceParameters, dev, params, self.flags)

    def close(self) -> None:
        """Close the connection (the Host's read-write one only when it is our own)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as err:  # closing a dead connection: nothing to do
                log.debug("closing libvirt: %r", err)
        if self._own_host:
            self.host.drop_read_write()


def read_boot_id(path: StrPath = BOOT_ID_PATH) -> str:
    """The kernel's boot id ("" when unknown: then reboots cannot be told apart)."""
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def period_start(now: float, period: int, offset: int) -> float:
    """The start of the aligned period holding NOW."""
    return offset + math.floor((now - offset) / period) * period


def cap_params(found: Dict[str, int], rate: int) -> Dict[str, int]:
    """The outbound parameters to change so an interface stays within RATE KiB/s.

    bwmon lowers a slice's rate only when it exceeds the cap and leaves a slice
    already within it alone. Here the interface's long-run limit is
    ``outbound.average``: one already set at or below the cap means the
    interface is within it and nothing changes (its peak and burst, which only
    shape short bursts above that average, stay as they are). Otherwise the
    average is lowered to the cap, and the peak too where it is set above it;
    an unset peak stays unset (libvirt then bursts at the average), the burst
    is never changed. Nothing is ever raised. (libvirt replaces the whole
    outbound setting, so the parameters kept are passed again as found.)
    """
    average = int(found.get("outbound.average", 0))
    if 0 < average <= rate:
        return {}
    peak = int(found.get("outbound.peak", 0))
    return {
        "outbound.average": rate,
        "outbound.peak": min(peak, rate),
        "outbound.burst": int(found.get("outbound.burst", 0)),
    }


class Accounting:
    """Usage per VM and interface per period, persisted; fed once per cycle."""

    def __init__(
        self,
        config: AccountingConfig,
        *,
        state_dir: StrPath | None = None,
        shaper: Shaper | None = None,
        on_alarm: Callable[[Alarm], None] | None = None,
        boot_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._state_dir = os.fspath(state_dir) if state_dir is not None else None
        self.shaper = shaper
        self.on_alarm = on_alarm
        self.boot_id = read_boot_id() if boot_id is None else boot_id
        self._clock = clock
        self.state: Dict[str, Any] = self._load()

    @property
    def state_file(self) -> str:
        """The accounting state file (read by ``vhostmdctl usage``)."""
        return os.path.join(self._state_dir or self.config.state_dir, ACCOUNTING_FILE)

    def _empty(self) -> Dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "boot_id": self.boot_id,
            "period": self.config.period,
            "period_offset": self.config.period_offset,
            "period_start": None,
            "vms": {},
            "restore": [],
            "previous": None,
        }

    def _load(self) -> Dict[str, Any]:
        try:
            data = read_json(self.state_file)
        except StateFileError as err:
            # Unreadable state must not stop metrics; keep the file for a human.
            log.error("%s: starting accounting afresh", err)
            with contextlib.suppress(OSError):
                os.replace(self.state_file, self.state_file + ".bad")
            return self._empty()
        if data is None:
            return self._empty()
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            log.error("%s: unknown state version, starting accounting afresh", self.state_file)
            return self._empty()
        return data

    def save(self) -> None:
        """Write the state atomically (raises StateFileError)."""
        write_json_atomic(self.state_file, self.state)

    # --- the cycle --------------------------------------------------------------

    def update(self, stats: CycleStats) -> None:
        """Account one cycle's counters, handle the period boundary, budgets, caps; save."""
        now = stats.wall
        start = period_start(now, self.config.period, self.config.period_offset)
        st = self.state
        st["period"] = self.config.period
        st["period_offset"] = self.config.period_offset
        if st["period_start"] is None:
            st["period_start"] = start
        elif start > st["period_start"]:
            self._end_period(start, {vm.uuid for vm in stats.vms})
        elif start < st["period_start"]:
            log.warning("the clock went back before the current period: still counting in it")
        rebooted = st.get("boot_id") != self.boot_id
        if rebooted:
            log.info("host boot id changed: every counter restarted from 0")
        vms: Dict[str, Any] = st["vms"]
        for vm in stats.vms:
            entry = vms.get(vm.uuid)
            known = entry is not None
            if entry is None:
                entry = vms[vm.uuid] = {"name": vm.name, "domain_id": vm.id, "nics": {}}
            restarted = known and (rebooted or entry.get("domain_id") != vm.id)
            entry["name"] = vm.name
            entry["domain_id"] = vm.id
            entry["last_seen"] = now
            for nic in vm.nics:
                n = entry["nics"].get(nic.name)
                if n is None:
                    n = {"rx": 0, "tx": 0, "last_rx": None, "last_tx": None}
                    entry["nics"][nic.name] = n
                    fresh = not known  # baseline for a VM never seen; else hot-plugged: from 0
                else:
                    fresh = False
                for way, counter in (("rx", nic.rx_bytes), ("tx", nic.tx_bytes)):
                    if counter is None:
                        continue
                    last = n[f"last_{way}"]
                    if fresh and last is None:
                        delta = 0
                    elif last is None or restarted or counter < last:
                        delta = counter  # the counter (re)started from 0
                    else:
                        delta = counter - last
                    n[way] += delta
                    n[f"last_{way}"] = counter
            self._check_budget(vm.uuid, entry, now)
        st["boot_id"] = self.boot_id
        self._retry_restores()
        try:
            self.save()
        except StateFileError as err:
            log.error("%s", err)

    @staticmethod
    def totals(entry: Dict[str, Any]) -> Dict[str, int]:
        """A VM entry's rx and tx over all its interfaces."""
        return {
            "rx": sum(int(n["rx"]) for n in entry["nics"].values()),
            "tx": sum(int(n["tx"]) for n in entry["nics"].values()),
        }

    def period_end(self) -> float | None:
        """The end of the current period (None before the first cycle)."""
        start = self.state.get("period_start")
        return None if start is None else float(start) + self.config.period

    def _end_period(self, new_start: float, running: set[str]) -> None:
        st = self.state
        old_start = st["period_start"]
        previous: Dict[str, Any] = {}
        for uuid, entry in st["vms"].items():
            previous[uuid] = {
                "name": entry["name"],
                **self.totals(entry),
                "nics": {dev: {"rx": n["rx"], "tx": n["tx"]} for dev, n in entry["nics"].items()},
            }
        st["previous"] = {
            "period_start": old_start,
            "period_end": old_start + self.config.period,
            "vms": previous,
        }
        log.info("accounting period starting at %.0f ended; starting the next one", old_start)
        for uuid, entry in list(st["vms"].items()):
            for dev, params in entry.pop("capped", {}).items():
                st["restore"].append(
                    {"uuid": uuid, "name": entry["name"], "dev": dev, "params": params}
                )
            if uuid not in running:
                del st["vms"][uuid]  # gone: dropped at the end of the period
                continue
            entry.pop("alarmed_tx", None)
            entry.pop("alarmed_rx", None)
            for n in entry["nics"].values():
                n["rx"] = 0
                n["tx"] = 0
        st["period_start"] = new_start
        # Write the restore list before touching libvirt: a crash now still restores.
        try:
            self.save()
        except StateFileError as err:
            log.error("%s", err)

    def _retry_restores(self) -> None:
        pending = self.state["restore"]
        if not pending or self.shaper is None:
            return
        left = []
        for item in pending:
            params = {k: int(v) for k, v in item["params"].items() if k in OUTBOUND_KEYS}
            try:
                self.shaper.set(item["uuid"], item["dev"], params)
            except ShapingError as err:
                if err.gone:
                    log.info("VM %s is gone: nothing to restore on %s", item["name"], item["dev"])
                    continue
                log.error("restoring the bandwidth of VM %s: %s (will retry)", item["name"], err)
                left.append(item)
                continue
            log.info(
                "VM %s interface %s: bandwidth restored to %s", item["name"], item["dev"], params
            )
        self.state["restore"] = left

    # --- budgets ----------------------------------------------------------------

    def _check_budget(self, uuid: str, entry: Dict[str, Any], now: float) -> None:
        budget = self.config.budget_for(uuid, entry["name"])
        entry["budget"] = {"tx": budget.tx, "rx": budget.rx, "enforce": budget.enforce}
        used = self.totals(entry)
        for way in ("tx", "rx"):
            limit = getattr(budget, way)
            if limit is None or used[way] < limit or entry.get(f"alarmed_{way}"):
                continue
            entry[f"alarmed_{way}"] = True
            self._alarm(uuid, entry, way, used[way], limit, now)
            if way == "tx" and budget.enforce and "capped" not in entry:
                self._cap(uuid, entry, budget)

    def _alarm(
        self, uuid: str, entry: Dict[str, Any], way: str, used: int, limit: int, now: float
    ) -> None:
        end = self.period_end()
        alarm = Alarm(
            time=now,
            object="vm",
            uuid=uuid,
            name=entry["name"],
            variable=f"net_{way}_budget",
            value=float(used),
            level=float(limit),
            sense="high",
            period=self.config.period,
            priority=3,
            message=(
                f"VM {entry['name']} ({uuid}) {'sent' if way == 'tx' else 'received'} "
                f"{used} bytes, budget {limit} bytes per {self.config.period} s "
                f"(period ends at {end:.0f})"
            ),
        )
        if self.on_alarm is not None:
            self.on_alarm(alarm)
        else:
            log.warning("ALARM %s", alarm.message)

    def cap_rate_kib(self, budget: Budget, nics: int) -> int:
        """The outbound.average (KiB/s) per interface: the budget's average rate, split."""
        assert budget.tx is not None
        # Never 0: libvirt reads an average of 0 as "no limit".
        return max(1, budget.tx // self.config.period // 1024 // max(1, nics))

    def _cap(self, uuid: str, entry: Dict[str, Any], budget: Budget) -> None:
        if self.shaper is None:
            log.error("VM %s: budget enforcement configured but no libvirt shaper", entry["name"])
            return
        devs = sorted(entry["nics"])
        rate = self.cap_rate_kib(budget, len(devs))
        found_all: Dict[str, Dict[str, int]] = {}
        for dev in devs:
            try:
                found_all[dev] = self.shaper.get(uuid, dev)
            except ShapingError as err:
                log.error("cannot read the bandwidth of VM %s: %s", entry["name"], err)
        changes = {dev: cap_params(found, rate) for dev, found in found_all.items()}
        # Only interfaces that change are capped, and so restored later.
        originals = {dev: found_all[dev] for dev, change in changes.items() if change}
        for dev in sorted(set(found_all) - set(originals)):
            log.info(
                "VM %s interface %s: outbound limit already within %d KiB/s, left alone",
                entry["name"], dev, rate,
            )
        if not found_all:
            return
        # Persist what we found before changing anything (crash-safe restore).
        entry["capped"] = originals
        try:
            self.save()
        except StateFileError as err:
            log.error("not capping VM %s: %s", entry["name"], err)
            del entry["capped"]
            return
        for dev in originals:
            params = changes[dev]
            try:
                self.shaper.set(uuid, dev, params)
            except ShapingError as err:
                log.error("cannot cap the bandwidth of VM %s: %s", entry["name"], err)
                continue
            log.warning(
                "VM %s interface %s: outbound rate capped (%s) until %.0f",
                entry["name"], dev, " ".join(f"{k}={v}" for k, v in sorted(params.items())),
                self.period_end() or 0,
            )

    # --- readers ----------------------------------------------------------------

    def reconfigure(self, config: AccountingConfig) -> None:
        """A reloaded config: budgets apply from the next cycle; a new period length at once."""
        self.config = config

    def guest_metrics(self, uuid: str) -> List[GuestMetric]:
        """The accounting metrics of one VM (only when the config opts in)."""
        if not self.config.guest_metrics:
            return []
        entry = self.state["vms"].get(uuid)
        if entry is None:
            return []
        used = self.totals(entry)
        budget = self.config.budget_for(uuid, entry["name"])
        return [
            GuestMetric(GUEST_TX_BYTES, "uint64", "bytes", str(used["tx"])),
            GuestMetric(GUEST_RX_BYTES, "uint64", "bytes", str(used["rx"])),
            GuestMetric(GUEST_TX_BUDGET, "uint64", "bytes", str(budget.tx or 0)),
            GuestMetric(GUEST_RX_BUDGET, "uint64", "bytes", str(budget.rx or 0)),
            GuestMetric(GUEST_PERIOD_END, "uint64", "s", str(int(self.period_end() or 0))),
            GuestMetric(GUEST_CAPPED, "uint32", None, "1" if entry.get("capped") else "0"),
        ]
