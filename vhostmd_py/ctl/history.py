"""``vhostmdctl list``, ``history``, ``graph``: the history (reads the state directory only).

No running daemon is needed: the command reads the RRD files and index.json
the daemon keeps in its state directory. When the daemon writes through
rrdcached (recorded in the index, or ``--daemon ADDR``), reads ask rrdcached
to flush the file first, and fall back to the file as it is when rrdcached
does not answer.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, NoReturn, Sequence, Tuple

import click

from vhostmd_py.config import parse_duration
from vhostmd_py.errors import VhostmdError
from vhostmd_py.history.errors import (
    HistoryError,
    StateDirError,
    UnknownMetricError,
    UnknownVmError,
)
from vhostmd_py.history.index import Index, read_index
from vhostmd_py.history.rrd import CFS, HOST_SOURCES, VM_SOURCES, DataSource

# Metric groups (what --metric names) -> data sources, per kind of file.
VM_METRICS: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpu",),
    "net": ("net_rx", "net_tx"),
    "net_pkts": ("net_rx_pkts", "net_tx_pkts"),
    "disk": ("disk_rd", "disk_wr"),
    "disk_req": ("disk_rd_req", "disk_wr_req"),
}
HOST_METRICS: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpu",),
    "iowait": ("iowait",),
    "steal": ("steal",),
    "load": ("load1",),
    "mem": ("mem_used",),
}
PERIODS = {"day": 86400, "week": 7 * 86400, "month": 30 * 86400}
GRAPH_METRICS = ("cpu", "net", "disk")
# nova's graphs of rates: logarithmic from 1000 bytes/s (--lower-limit 1000 --rigid).
LOG_FLOOR = 1000.0
# The longest window: the 1-day archive holds 366 rows.
MAX_SPAN = 366 * 86400
# A window clipped to where the data starts keeps at least this much (seconds).
MIN_SPAN = 60


@dataclass(frozen=True)
class Target:
    """A resolved --vm: the file, its display name, its UUID (None for the host)."""

    path: str
    name: str
    uuid: str | None
    sources: Tuple[DataSource, ...]
    metrics: Dict[str, Tuple[str, ...]]


@dataclass(frozen=True)
class State:
    """The state directory and how to read it."""

    state_dir: str
    index: Index
    daemon: str | None


def open_state(state_dir: str, daemon: str | None) -> State:
    """The state directory and its index (StateDirError when it is not there yet)."""
    if not os.path.isdir(state_dir):
        raise StateDirError(
            state_dir,
            "state directory does not exist (the daemon creates it on its first cycle "
            "with <history> in vhostmd.conf; see --state-dir)",
        )
    index = read_index(state_dir)
    return State(state_dir, index, daemon or index.rrdcached)


def resolve(state: State, vm: str) -> Target:
    """``host``, a UUID or a VM name -> its file (UnknownVmError when there is none)."""
    if vm == "host":
        path = os.path.join(state.state_dir, "host.rrd")
        if not os.path.exists(path):
            raise UnknownVmError(state.state_dir, vm, len(state.index.vms))
        return Target(path, "host", None, HOST_SOURCES, HOST_METRICS)
    uuid: str | None = None
    if vm in state.index.vms:
        uuid = vm
    else:
        named = [(e.last_seen, u) for u, e in state.index.vms.items() if e.name == vm]
        if named:
            uuid = max(named)[1]  # the most recently seen VM of that name
        elif "/" not in vm and os.path.exists(os.path.join(state.state_dir, "vm", f"{vm}.rrd")):
            uuid = vm  # a file the index does not know (yet)
    if uuid is None:
        raise UnknownVmError(state.state_dir, vm, len(state.index.vms))
    path = os.path.join(state.state_dir, "vm", f"{uuid}.rrd")
    if not os.path.exists(path):
        raise UnknownVmError(state.state_dir, vm, len(state.index.vms))
    entry = state.index.vms.get(uuid)
    return Target(path, entry.name if entry else uuid, uuid, VM_SOURCES, VM_METRICS)


def metric_sources(target: Target, metric: str) -> Tuple[DataSource, ...]:
    """The data sources of a metric group or of one data source by name."""
    by_name = {ds.name: ds for ds in target.sources}
    names = target.metrics.get(metric) or ((metric,) if metric in by_name else None)
    if names is None:
        choices = ", ".join([*target.metrics, *by_name])
        raise UnknownMetricError(target.path, metric, choices)
    return tuple(by_name[n] for n in names)


def _rrdtool() -> Any:
    try:
        import rrdtool
    except ImportError as err:  # a guest-only install
        raise HistoryError(
            "rrdtool", "the rrdtool binding is not installed (pip install 'vhostmd-py[host]')"
        ) from err
    return rrdtool


def _with_daemon(state: State, call: Callable[[List[str]], Any]) -> Any:
    """call(extra args) through rrdcached when known, else (or when it fails) directly."""
    rrdtool = _rrdtool()
    if state.daemon:
        try:
            return call(["--daemon", state.daemon])
        except rrdtool.OperationalError as err:
            click.echo(
                f"vhostmdctl: warning: rrdcached at {state.daemon} failed ({err}); "
                "reading the file as it is",
                err=True,
            )
    return call([])


@dataclass(frozen=True)
class Series:
    """Fetched rows: start, step, column data sources, rows of values (None: unknown)."""

    start: int
    step: int
    sources: Tuple[DataSource, ...]
    rows: Tuple[Tuple[float | None, ...], ...]

    def times(self) -> List[int]:
        """The end of each row's interval (rrdtool's timestamp of the row)."""
        return [self.start + (i + 1) * self.step for i in range(len(self.rows))]


def fetch(
    state: State, target: Target, sources: Sequence[DataSource], cf: str, start: int, end: int
) -> Series:
    """Rows of these data sources between START and END (rrdtool picks the resolution)."""
    rrdtool = _rrdtool()

    def call(extra: List[str]) -> Any:
        return rrdtool.fetch(target.path, cf, "-s", str(start), "-e", str(end), *extra)

    try:
        (first, _, step), names, rows = _with_daemon(state, call)
    except rrdtool.OperationalError as err:
        raise HistoryError(target.path, f"cannot read: {err}") from err
    cols = [list(names).index(ds.name) for ds in sources]
    # rrdtool returns one row past END when END is not on a row boundary: drop it.
    count = sum(1 for i in range(len(rows)) if int(first) + (i + 1) * int(step) <= end)
    picked = tuple(tuple(row[c] for c in cols) for row in rows[:count])
    return Series(int(first), int(step), tuple(sources), picked)


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _num(v: float | None) -> str:
    return "" if v is None or math.isnan(v) else f"{v:.2f}"


def render(series: Series, target: Target, metric: str, cf: str, fmt: str) -> str:
    """The series as a table, JSON or CSV."""
    times = series.times()
    heads = [f"{ds.name} ({ds.unit})" if ds.unit else ds.name for ds in series.sources]
    if fmt == "json":
        doc = {
            "vm": target.name,
            "uuid": target.uuid,
            "metric": metric,
            "cf": cf,
            "step": series.step,
            "columns": [ds.name for ds in series.sources],
            "units": [ds.unit for ds in series.sources],
            "rows": [
                {"time": t, **{ds.name: v for ds, v in zip(series.sources, row)}}
                for t, row in zip(times, series.rows)
            ],
        }
        return json.dumps(doc, indent=1) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["time", *[ds.name for ds in series.sources]])
        for t, row in zip(times, series.rows):
            writer.writerow([t, *[_num(v) for v in row]])
        return out.getvalue()
    widths = [max(len(h), 12) for h in heads]
    lines = ["time                  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    for t, row in zip(times, series.rows):
        cells = [(_num(v) or "-").rjust(w) for v, w in zip(row, widths)]
        lines.append(f"{_iso(t)}  " + "  ".join(cells))
    title = f"# {target.name} {metric} {cf}, {series.step} s per row"
    return "\n".join([title, *lines]) + "\n"


def data_start(state: State, target: Target, sources: Sequence[DataSource], end: int) -> int | None:
    """When the file's first known value of SOURCES begins, or None when before every window.

    The finest archive (AVERAGE) whose window holds the beginning says when:
    a file a few minutes old has its data only in the finest ones.
    """
    rrdtool = _rrdtool()
    try:
        info = _with_daemon(state, lambda extra: rrdtool.info(target.path, *extra))
    except rrdtool.OperationalError as err:
        raise HistoryError(target.path, f"cannot read: {err}") from err
    step = int(info["step"])
    archives = set()
    i = 0
    while f"rra[{i}].cf" in info:
        if info[f"rra[{i}].cf"] == "AVERAGE":
            archives.add((int(info[f"rra[{i}].pdp_per_row"]) * step, int(info[f"rra[{i}].rows"])))
        i += 1
    for resolution, rows in sorted(archives):
        span = resolution * rows
        stop = end - end % resolution
        try:
            (start, _, got), names, values = rrdtool.fetch(
                target.path, "AVERAGE", "-r", str(resolution), "-s", str(stop - span + resolution),
                "-e", str(stop),
            )
        except rrdtool.OperationalError as err:
            raise HistoryError(target.path, f"cannot read: {err}") from err
        cols = [list(names).index(ds.name) for ds in sources]
        known = [n for n, row in enumerate(values) if any(row[c] is not None for c in cols)]
        if known and known[0] > 0:
            # The data begins inside this archive's window: the finest account of it.
            return int(start) + known[0] * int(got)
    # Known from the start of every archive's window (or nowhere): nothing to clip.
    return None


def graph_window(state: State, target: Target, sources: Sequence[DataSource], span: int,
                 end: int) -> Tuple[int, bool]:
    """(start, clipped): the window's start, moved up to where the data begins.

    rrdtool draws from the finest archive covering the whole window: a window
    of a day on a host that has run five minutes would use the 5-minute
    archive (one row, or none) and leave the graph empty; starting the window
    where the data starts makes it use the finest archive that holds it.
    """
    start = end - span
    first = data_start(state, target, sources, end)
    if first is None or first <= start:
        return start, False
    return min(max(first, start), end - MIN_SPAN), True


def _span_text(seconds: int) -> str:
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def graph(
    state: State,
    target: Target,
    metric: str,
    span: int,
    output: str,
    width: int,
    height: int,
    end: int,
    *,
    scale: str = "log",
    floor: float = LOG_FLOOR,
) -> Tuple[int, Dict[str, Any]]:
    """nova's graph of a metric over SPAN seconds up to END, a PNG of exactly WIDTH x HEIGHT.

    Returns the window's start (later than END - SPAN when the data starts
    later) and rrdtool's account of what it drew (graphv: value_min, ...).
    Rates (net, disk) are drawn on nova's logarithmic scale from FLOOR bytes/s
    (values below it at the floor) unless SCALE is "linear"; no rrdtool tag.
    """
    rrdtool = _rrdtool()
    if metric not in GRAPH_METRICS or metric not in target.metrics:
        raise UnknownMetricError(
            target.path, metric, ", ".join(m for m in GRAPH_METRICS if m in target.metrics)
        )
    sources = metric_sources(target, metric)
    start, clipped = graph_window(state, target, sources, span, end)
    file = target.path.replace(":", "\\:")
    titles = {"cpu": "CPU", "net": "network", "disk": "disk"}
    when = f"since {_iso(start)}" if clipped else f"last {_span_text(span)}"
    args = [
        "--imgformat",
        "PNG",
        "--disable-rrdtool-tag",
        "--full-size-mode",
        "--width",
        str(width),
        "--height",
        str(height),
        "--start",
        str(start),
        "--end",
        str(end),
        "--title",
        f"{target.name} - {titles[metric]} - {when}",
    ]
    if metric == "cpu":
        args += [
            "--vertical-label",
            "% cpu used",
            "--lower-limit",
            "0",
            "--upper-limit",
            "100",
            f"DEF:cpu={file}:cpu:AVERAGE",
            "AREA:cpu#eacc00:% CPU",
        ]
    else:
        if scale == "log":
            args += ["--logarithmic", "--units", "si", "--lower-limit", f"{floor:g}", "--rigid"]
        else:
            args += ["--lower-limit", "0"]
        names = ("rx", "tx", "In traffic", "Out traffic") if metric == "net" else (
            "rd", "wr", "Read", "Write")
        first_ds, second_ds = (ds.name for ds in sources)
        args += [
            "--vertical-label",
            "bytes/s",
            f"DEF:{names[0]}={file}:{first_ds}:AVERAGE",
            f"DEF:{names[1]}={file}:{second_ds}:AVERAGE",
            f"AREA:{names[0]}#00FF00:{names[2]}",
            f"LINE1:{names[1]}#0000FF:{names[3]}",
        ]

    def call(extra: List[str]) -> Any:
        return rrdtool.graphv(output, *extra, *args)

    try:
        drawn = _with_daemon(state, call)
    except rrdtool.OperationalError as err:
        raise HistoryError(output, f"cannot draw the graph: {err}") from err
    return start, dict(drawn)


# --- the command ---------------------------------------------------------------------


def _fail(err: VhostmdError) -> NoReturn:
    click.echo(f"vhostmdctl: {err}", err=True)
    sys.exit(1)


def _end(value: str) -> int:
    if value == "now":
        return int(time.time())
    try:
        return int(float(value))
    except ValueError:
        raise click.BadParameter(
            f"'{value}' is neither 'now' nor seconds since the epoch"
        ) from None


def _state(ctx: click.Context) -> State:
    state_dir, rrdcached = ctx.obj
    try:
        return open_state(state_dir, rrdcached)
    except VhostmdError as err:
        _fail(err)


@click.command("list")
@click.pass_context
def list_cmd(ctx: click.Context) -> None:
    """The VMs with a history: UUID, name, last seen."""
    state = _state(ctx)
    for uuid, entry in sorted(state.index.vms.items(), key=lambda kv: kv[1].name):
        click.echo(f"{uuid}  {_iso(int(entry.last_seen))}  {entry.name}")


@click.command("history")
@click.option("--vm", required=True, help="VM name, UUID, or 'host'.")
@click.option(
    "--metric",
    required=True,
    help="cpu, net, net_pkts, disk, disk_req (VMs); cpu, iowait, steal, load, mem "
    "(host); or one data source by name.",
)
@click.option("--cf", type=click.Choice(CFS), default="AVERAGE", show_default=True)
@click.option("--since", default="1h", show_default=True, help="How far back: 90s, 15m, 1h, 7d...")
@click.option(
    "--end", default="now", show_default=True, help="End: now or seconds since the epoch."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
)
@click.pass_context
def history_cmd(
    ctx: click.Context, vm: str, metric: str, cf: str, since: str, end: str, fmt: str
) -> None:
    """Consolidated values of one metric of a VM or the host."""
    try:
        span = parse_duration(since)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--since") from None
    stop = _end(end)
    state = _state(ctx)
    try:
        target = resolve(state, vm)
        sources = metric_sources(target, metric)
        series = fetch(state, target, sources, cf, stop - span, stop)
    except VhostmdError as err:
        _fail(err)
    click.echo(render(series, target, metric, cf, fmt), nl=False)


@click.command("graph")
@click.option("--vm", required=True, help="VM name, UUID, or 'host'.")
@click.option("--metric", required=True, type=click.Choice(GRAPH_METRICS))
@click.option(
    "--since", default=None,
    help="Window: 5m, 1h, 25h, 7d, 1w ... up to 366d (default 1d). A window starting "
    "before the data is clipped to where it starts.",
)
@click.option("--period", type=click.Choice(list(PERIODS)), default=None,
              help="Same as --since 1d, 7d, 30d.")
@click.option("--scale", type=click.Choice(["log", "linear"]), default="log", show_default=True,
              help="net and disk: nova's logarithmic scale from --floor, or linear from 0.")
@click.option("--floor", type=click.FloatRange(min=1e-3), default=LOG_FLOOR, show_default=True,
              help="Lowest bytes/s of the logarithmic scale (lower values drawn at it).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG file.")
@click.option("--width", type=click.IntRange(200, 8000), default=600, show_default=True)
@click.option("--height", type=click.IntRange(100, 8000), default=200, show_default=True)
@click.option(
    "--end", default="now", show_default=True, help="End: now or seconds since the epoch."
)
@click.pass_context
def graph_cmd(
    ctx: click.Context,
    vm: str,
    metric: str,
    since: str | None,
    period: str | None,
    scale: str,
    floor: float,
    output: str,
    width: int,
    height: int,
    end: str,
) -> None:
    """nova's graphs: CPU %, network or disk bytes/s over minutes to a year (PNG)."""
    if since is not None and period is not None:
        raise click.BadParameter("give --since or --period, not both", param_hint="--since")
    if period is not None:
        span = PERIODS[period]
    else:
        try:
            span = parse_duration(since or "1d")
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--since") from None
    if not MIN_SPAN <= span <= MAX_SPAN:
        raise click.BadParameter(
            f"{since} is outside {MIN_SPAN} s .. {MAX_SPAN // 86400} days", param_hint="--since"
        )
    stop = _end(end)
    state = _state(ctx)
    try:
        target = resolve(state, vm)
        graph(state, target, metric, span, output, width, height, stop, scale=scale, floor=floor)
    except VhostmdError as err:
        _fail(err)
    click.echo(output)

