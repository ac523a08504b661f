"""The round-robin store: one rrdtool file per host and per VM, in a state directory.

Layout of the state directory::

    STATE_DIR/host.rrd            the host
    STATE_DIR/vm/UUID.rrd         one per VM, by libvirt UUID
    STATE_DIR/index.json          uuid -> name, last seen (see index.py)

Every data source is a GAUGE fed with the values the daemon derived
(rates.py), so the counter semantics live in one place (ours) and rrdtool
only consolidates. Each file has AVERAGE, MIN, MAX and LAST archives at six
resolutions (:func:`archive_layout`): XenServer's four (the update period for
10 minutes, 1 minute for 2 hours, 1 hour for 1 week, 1 day for 1 year) plus
5 minutes for 25 hours and 2 hours for 5 weeks, so that each graph period has
an archive of a few hundred rows covering it (rrdtool draws from the finest
archive covering the whole period: the day graph from the 5-minute one, the
week graph from the 1-hour one, the month graph from the 2-hour one; with
XenServer's four alone a day was 24 hourly rows, and a VM that ran for less
than half an hour of a clock hour showed nothing).

A file made with an older layout (XenServer's four only) is upgraded when the
daemon first opens it: ``rrdtool create --source`` makes a file with the
missing archives, prefilled from the old file's data, which then replaces it
(atomically, as at creation). If that fails the old file is kept and goes on
being updated as it is; ``vhostmdctl`` reads either layout.

Files are created under a temporary name and renamed, so a kill -9 never
leaves a half-made file under the real name; the directories are fsync'ed once
per cycle that created files (:meth:`RrdStore.sync_dirs`), not once per file
(1000 fsyncs made the first cycle at N = 1000 take seconds). A file torn by a
power loss fails rrdtool's checks on the next start: it is moved aside to
``NAME.corrupt`` and a new one is made. A daemon restart goes on
with the same files: updates not later than a file's last update are skipped,
and the first cycle after a restart writes unknown values (no counter baseline
yet), so the downtime shows as a gap and never as a spike; the step in which
a value comes back from unknown is unknown too (:meth:`RrdStore.update`), so
it never shows as a dip either.

With ``daemon`` (an rrdcached address such as ``unix:/run/rrdcached.sock``)
updates go through rrdcached, which batches the disk writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Sequence, Tuple

import rrdtool

from vhostmd_py.errors import StrPath
from vhostmd_py.fs import fsync_dir, make_dirs, remove, translated
from vhostmd_py.history.errors import HistoryError

log = logging.getLogger(__name__)

CFS = ("AVERAGE", "MIN", "MAX", "LAST")
XFF = 0.5

# (resolution, coverage) in seconds; resolution 0 is the update period.
# XenServer's archives (the update period for 10 min, 1 min for 2 h, 1 h for 1 week,
# 1 day for 1 year): the files of vhostmd-py before the graph archives.
XENSERVER_TARGETS = ((0, 600), (60, 7200), (3600, 7 * 86400), (86400, 366 * 86400))
# Graph archives: 5 min for 25 h (the day graph, with an hour to spare for the
# alignment), 2 h for 5 weeks (the month graph; the week graph uses the 1 h one).
GRAPH_TARGETS = ((300, 25 * 3600), (7200, 35 * 86400))
ARCHIVE_TARGETS = tuple(sorted(XENSERVER_TARGETS + GRAPH_TARGETS))

Targets = Sequence[Tuple[int, int]]


@dataclass(frozen=True)
class DataSource:
    """One GAUGE data source: name (rrdtool's, <= 19 chars), bounds, unit, meaning."""

    name: str
    minimum: float | None
    maximum: float | None
    unit: str
    description: str

    def spec(self, heartbeat: int) -> str:
        """``DS:name:GAUGE:heartbeat:min:max``."""
        lo = "U" if self.minimum is None else f"{self.minimum:g}"
        hi = "U" if self.maximum is None else f"{self.maximum:g}"
        return f"DS:{self.name}:GAUGE:{heartbeat}:{lo}:{hi}"


VM_SOURCES: Tuple[DataSource, ...] = (
    DataSource("cpu", 0, 100, "%", "CPU utilisation of all vCPUs (100 = every vCPU busy)"),
    DataSource("net_rx", 0, None, "bytes/s", "bytes received, all interfaces"),
    DataSource("net_tx", 0, None, "bytes/s", "bytes sent, all interfaces"),
    DataSource("net_rx_pkts", 0, None, "packets/s", "packets received, all interfaces"),
    DataSource("net_tx_pkts", 0, None, "packets/s", "packets sent, all interfaces"),
    DataSource("disk_rd", 0, None, "bytes/s", "bytes read, all disks"),
    DataSource("disk_wr", 0, None, "bytes/s", "bytes written, all disks"),
    DataSource("disk_rd_req", 0, None, "requests/s", "read requests, all disks"),
    DataSource("disk_wr_req", 0, None, "requests/s", "write requests, all disks"),
)

HOST_SOURCES: Tuple[DataSource, ...] = (
    DataSource("cpu", 0, 100, "%", "CPU utilisation of all CPUs (busy: not idle, not iowait)"),
    DataSource("iowait", 0, 100, "%", "CPU time waiting for I/O"),
    DataSource("steal", 0, 100, "%", "CPU time stolen by the hypervisor below us"),
    DataSource("load1", 0, None, "", "1-minute load average"),
    DataSource("mem_used", 0, 100, "%", "memory in use (MemTotal - MemAvailable)"),
)

_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def archive_layout(step: int, targets: Targets | None = None) -> Tuple[Tuple[int, int], ...]:
    """(steps per row, rows) of each archive for this step, finest first, no duplicates.

    ``targets`` defaults to :data:`ARCHIVE_TARGETS` (looked up at call time).
    """
    layout: Dict[int, int] = {}
    for resolution, coverage in ARCHIVE_TARGETS if targets is None else targets:
        steps = max(1, round(resolution / step)) if resolution else 1
        rows = max(1, math.ceil(coverage / (steps * step)))
        layout[steps] = max(rows, layout.get(steps, 0))
    return tuple(sorted(layout.items()))


def rra_specs(step: int, targets: Targets | None = None) -> List[str]:
    """``RRA:CF:xff:steps:rows`` of every archive, finest first, the four CFs each."""
    return [
        f"RRA:{cf}:{XFF}:{steps}:{rows}"
        for steps, rows in archive_layout(step, targets)
        for cf in CFS
    ]


def create_args(
    step: int,
    heartbeat: int,
    sources: Sequence[DataSource],
    start: int,
    targets: Targets | None = None,
) -> List[str]:
    """rrdtool create's arguments (after the file name)."""
    args = ["--step", str(step), "--start", str(start)]
    args += [ds.spec(heartbeat) for ds in sources]
    return args + rra_specs(step, targets)


def missing_archives(info: Dict[str, Any], targets: Targets | None = None) -> List[str]:
    """``RRA:`` specs of the layout that a file (its ``rrdtool info``) lacks.

    An archive counts as present when the file has one of the same CF and
    steps per row with at least as many rows (an older, longer one is kept).
    """
    have: Dict[Tuple[str, int], int] = {}
    i = 0
    while f"rra[{i}].cf" in info:
        key = (str(info[f"rra[{i}].cf"]), int(info[f"rra[{i}].pdp_per_row"]))
        have[key] = max(have.get(key, 0), int(info[f"rra[{i}].rows"]))
        i += 1
    step = int(info["step"])
    return [
        f"RRA:{cf}:{XFF}:{steps}:{rows}"
        for steps, rows in archive_layout(step, targets)
        for cf in CFS
        if have.get((cf, steps), 0) < rows
    ]


def _bound(value: Any) -> str:
    return (
        "U" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:g}"
    )


def _kept_specs(info: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """The DS: and RRA: specs of an existing file, as rrdtool create takes them."""
    names = sorted(
        (int(v), k[3:-7]) for k, v in info.items() if k.startswith("ds[") and k.endswith("].index")
    )
    ds_specs = []
    for _, name in names:
        heartbeat = info[f"ds[{name}].minimal_heartbeat"]
        lo, hi = (_bound(info.get(f"ds[{name}].{key}")) for key in ("min", "max"))
        ds_specs.append(f"DS:{name}:{info[f'ds[{name}].type']}:{heartbeat}:{lo}:{hi}")
    rra_specs_ = []
    i = 0
    while f"rra[{i}].cf" in info:
        rra_specs_.append(
            f"RRA:{info[f'rra[{i}].cf']}:{info[f'rra[{i}].xff']}:"
            f"{info[f'rra[{i}].pdp_per_row']}:{info[f'rra[{i}].rows']}"
        )
        i += 1
    return ds_specs, rra_specs_


def format_update(wall: float, values: Sequence[float | None]) -> str:
    """``TIME:v1:v2...`` with U for unknown values (millisecond timestamps)."""
    parts = [f"{wall:.3f}"]
    for v in values:
        parts.append("U" if v is None or math.isnan(v) else repr(float(v)))
    return ":".join(parts)


class RrdStore:
    """The RRD files of one state directory (all calls blocking; one thread at a time)."""

    def __init__(
        self,
        state_dir: StrPath,
        *,
        step: int,
        heartbeat: int,
        daemon: str | None = None,
        targets: Targets | None = None,
    ) -> None:
        self.state_dir = os.fspath(state_dir)
        self.vm_dir = os.path.join(self.state_dir, "vm")
        self.step = step
        self.heartbeat = heartbeat
        self.daemon = daemon
        # The layout of new files (and what older files are upgraded to).
        self.targets: Targets = ARCHIVE_TARGETS if targets is None else targets
        self._last: Dict[str, float] = {}  # path -> last update time written
        # path -> data sources whose last written value is unknown (see update).
        self._unknown: Dict[str, FrozenSet[int]] = {}
        self._daemon_failed = False

    # --- paths ------------------------------------------------------------------

    def host_path(self) -> str:
        """The host's file."""
        return os.path.join(self.state_dir, "host.rrd")

    def vm_path(self, uuid: str) -> str:
        """A VM's file (raises HistoryError for a UUID unfit for a file name)."""
        if not _SAFE_KEY.match(uuid):
            raise HistoryError(self.vm_dir, f"VM UUID {uuid!r} cannot name a file")
        return os.path.join(self.vm_dir, f"{uuid}.rrd")

    def prepare(self) -> None:
        """Create the state directory and its vm/ subdirectory (mode 0755)."""
        make_dirs(self.vm_dir, HistoryError, mode=0o755)

    # --- files ------------------------------------------------------------------

    def ensure(self, path: str, sources: Sequence[DataSource], now: float) -> bool:
        """Open or create a file; True when it was created. Remembers its last update.

        A file of an older layout is upgraded first (:meth:`upgrade`).
        """
        if path in self._last:
            return False
        if os.path.exists(path):
            try:
                info = rrdtool.info(path)
                missing = missing_archives(info, self.targets)
                if missing:
                    self.upgrade(path, info, missing)
                # last_update drops the sub-second part of the last update.
                self._last[path] = float(info["last_update"]) + 0.999
                return False
            except rrdtool.OperationalError as err:
                bad = f"{path}.corrupt"
                log.warning(
                    "%s is not a usable RRD (%s): moved to %s, starting anew", path, err, bad
                )
                try:
                    os.replace(path, bad)
                except OSError as move_err:
                    raise HistoryError(path, f"cannot move aside: {move_err}") from move_err
        self._create(path, sources, now)
        return True

    def upgrade(self, path: str, info: Dict[str, Any], missing: Sequence[str]) -> bool:
        """Add the MISSING archives to a file, keeping its data; False (logged) when not done.

        ``rrdtool create --source`` prefills the new archives from the old ones
        (best resolution available) and keeps the data sources, the archives and
        the last update time; the new file replaces the old one atomically.
        """
        if self.daemon is not None and not self._daemon_failed:
            try:
                rrdtool.flushcached("--daemon", self.daemon, path)
            except rrdtool.OperationalError as err:
                log.debug("flushing %s before the upgrade: %s", path, err)
        ds_specs, kept = _kept_specs(info)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            rrdtool.create(
                tmp, "--step", str(info["step"]), "--source", path, *ds_specs, *kept, *missing
            )
            os.replace(tmp, path)
        except (rrdtool.OperationalError, OSError) as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            log.warning(
                "%s: could not add the archives %s (%s): going on with it as it is",
                path,
                " ".join(missing),
                err,
            )
            return False
        log.info("%s: added %d archives (%s)", path, len(missing), " ".join(missing))
        return True

    def _create(self, path: str, sources: Sequence[DataSource], now: float) -> None:
        start = int(now) - self.step
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            rrdtool.create(
                tmp, *create_args(self.step, self.heartbeat, sources, start, self.targets)
            )
            os.replace(tmp, path)
        except (rrdtool.OperationalError, OSError) as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise HistoryError(path, f"cannot create RRD: {err}") from err
        self._last[path] = float(start)
        log.debug("created %s", path)

    def sync_dirs(self) -> None:
        """fsync the state directory and vm/ (after creating files)."""
        for path in (self.vm_dir, self.state_dir):
            with translated(HistoryError, path, "cannot fsync"):
                fsync_dir(path or ".")

    def update(self, path: str, wall: float, values: Sequence[float | None]) -> bool:
        """Add one sample; False when skipped (not later than the file's last update).

        rrdtool counts the unknown part of a step in whole seconds, so a known
        value whose interval starts inside a step after unknown time would be
        averaged with zeros over the fraction rrdtool dropped: the false dip at
        every (re)start. A data source coming back from unknown is therefore
        written unknown up to the next step boundary (an extra update there,
        in the same call) and known only from it; when no boundary lies before
        this sample it stays unknown this time. The step holding the switch is
        unknown, every known row is computed from two real samples.
        """
        last = self._last.get(path)
        if last is not None and wall <= last:
            log.debug("%s: skipping update at %.3f, last update %.3f", path, wall, last)
            return False
        # Data sources whose last written value is unknown: all of them for the
        # first write of this process (before it: a new file, or downtime).
        tail = self._unknown.get(path)
        if tail is None:
            tail = frozenset(range(len(values)))
        known = [v is not None and not math.isnan(v) for v in values]
        back = {i for i in tail if i < len(values) and known[i]}
        lines = []
        written: List[float | None] = list(values)
        if back and last is not None:
            boundary = math.ceil(last / self.step) * self.step
            if boundary == last:
                pass  # the unknown stretch already ends on a boundary
            elif boundary < wall:
                at_boundary = [None if i in back else v for i, v in enumerate(values)]
                lines.append(format_update(boundary, at_boundary))
            else:
                written = [None if i in back else v for i, v in enumerate(values)]
        lines.append(format_update(wall, written))
        try:
            if self.daemon is not None and not self._daemon_failed:
                try:
                    rrdtool.update("--daemon", self.daemon, path, *lines)
                except rrdtool.OperationalError as err:
                    if "rrdcached" not in str(err) and "connect" not in str(err):
                        raise
                    log.error(
                        "rrdcached at %s failed (%s): writing files directly", self.daemon, err
                    )
                    self._daemon_failed = True
                    rrdtool.update(path, *lines)
            else:
                rrdtool.update(path, *lines)
        except rrdtool.OperationalError as err:
            raise HistoryError(path, f"update failed: {err}") from err
        self._last[path] = wall
        self._unknown[path] = frozenset(
            i for i, v in enumerate(written) if v is None or math.isnan(v)
        )
        return True

    def forget(self, path: str) -> None:
        """Stop tracking and remove a file (flushing rrdcached's pending updates first)."""
        self._last.pop(path, None)
        self._unknown.pop(path, None)
        if self.daemon is not None and not self._daemon_failed:
            try:
                rrdtool.flushcached("--daemon", self.daemon, path)
            except rrdtool.OperationalError as err:
                log.debug("flushing %s before removal: %s", path, err)
        remove(path, HistoryError)

    def flush(self) -> None:
        """Ask rrdcached to write what it holds for our files (no-op without it)."""
        if self.daemon is None or self._daemon_failed or not self._last:
            return
        try:
            rrdtool.flushcached("--daemon", self.daemon, *sorted(self._last))
        except rrdtool.OperationalError as err:
            log.warning("rrdcached at %s did not flush: %s", self.daemon, err)


