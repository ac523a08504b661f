"""``vhostmdctl alarms`` and ``vhostmdctl usage``: read the daemon's state files.

Both only read (``alarms.json``, ``accounting.json`` in the state directory,
written atomically by the daemon), so they work while it runs, as any user
allowed to read the directory. vhostmd_py.ctl.main registers them in the group.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List

import click

from vhostmd_py.config import DEFAULT_STATE_DIR
from vhostmd_py.errors import StateFileError
from vhostmd_py.fs import read_json
from vhostmd_py.monitors.accounting import ACCOUNTING_FILE
from vhostmd_py.monitors.alarms import ALARMS_FILE

_FORMATS = click.Choice(["text", "json"])


def _when(t: Any) -> str:
    if not isinstance(t, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _read(path: str) -> Dict[str, Any]:
    try:
        data = read_json(path)
    except StateFileError as err:
        raise click.ClickException(str(err)) from err
    if data is None:
        raise click.ClickException(f"{path}: no such file (is the daemon configured for this?)")
    if not isinstance(data, dict):
        raise click.ClickException(f"{path}: not a vhostmd state file")
    return data


def _state_dir(given: str | None) -> str:
    """The command's --state-dir, else the group's (vhostmdctl --state-dir), else the default."""
    if given is not None:
        return given
    ctx = click.get_current_context()
    group = ctx.find_root().params.get("state_dir") if ctx.parent is not None else None
    return group if isinstance(group, str) else DEFAULT_STATE_DIR


@click.command("alarms")
@click.option("--state-dir", default=None,
              help="The daemon's state directory (default: vhostmdctl --state-dir).")
@click.option("--format", "fmt", type=_FORMATS, default="text", show_default=True)
@click.option("--active", "only_active", is_flag=True, help="Only the active alarms.")
@click.option("-n", "--last", type=click.IntRange(min=0), default=20, show_default=True,
              help="How many recent alarms to show.")
def alarms_command(state_dir: str | None, fmt: str, only_active: bool, last: int) -> None:
    """Recent and active alarms."""
    data = _read(os.path.join(_state_dir(state_dir), ALARMS_FILE))
    recent: List[Dict[str, Any]] = list(data.get("recent") or [])
    recent = recent[-last:] if last else []
    active: List[Dict[str, Any]] = list(data.get("active") or [])
    if fmt == "json":
        out = {"active": active} if only_active else {"active": active, "recent": recent}
        click.echo(json.dumps(out, indent=1, sort_keys=True))
        return
    click.echo(f"Active alarms: {len(active)}")
    for a in active:
        who = "host" if a.get("object") == "host" else f"{a.get('name')} ({a.get('uuid')})"
        since = _when(a.get("since"))
        click.echo(f"  {who}  {a.get('variable')} = {a.get('value')}  since {since}")
    if only_active:
        return
    click.echo(f"Recent alarms: {len(recent)}")
    for a in recent:
        click.echo(f"  {_when(a.get('time'))}  prio {a.get('priority')}  {a.get('message')}")


@click.command("usage")
@click.option("--state-dir", default=None,
              help="The daemon's state directory (default: vhostmdctl --state-dir).")
@click.option("--vm", "vms", multiple=True, help="Only this VM (name or UUID; repeatable).")
@click.option("--format", "fmt", type=_FORMATS, default="text", show_default=True)
def usage_command(state_dir: str | None, vms: tuple[str, ...], fmt: str) -> None:
    """Network usage per VM in the current accounting period, with budgets."""
    data = _read(os.path.join(_state_dir(state_dir), ACCOUNTING_FILE))
    start = data.get("period_start")
    period = data.get("period")
    end = start + period if isinstance(start, (int, float)) and isinstance(period, int) else None
    rows = []
    for uuid, entry in sorted((data.get("vms") or {}).items(), key=lambda i: i[1].get("name", "")):
        if vms and uuid not in vms and entry.get("name") not in vms:
            continue
        nics = entry.get("nics") or {}
        budget = entry.get("budget") or {}
        rows.append(
            {
                "uuid": uuid,
                "name": entry.get("name"),
                "rx": sum(int(n.get("rx", 0)) for n in nics.values()),
                "tx": sum(int(n.get("tx", 0)) for n in nics.values()),
                "interfaces": {d: {"rx": n.get("rx"), "tx": n.get("tx")} for d, n in nics.items()},
                "budget_tx": budget.get("tx"),
                "budget_rx": budget.get("rx"),
                "enforce": bool(budget.get("enforce")),
                "capped": bool(entry.get("capped")),
            }
        )
    if vms and not rows:
        raise click.ClickException(f"no accounting for {', '.join(vms)}")
    if fmt == "json":
        out = {"period_start": start, "period_end": end, "vms": rows}
        click.echo(json.dumps(out, indent=1, sort_keys=True))
        return
    click.echo(f"Period: {_when(start)} .. {_when(end)}")
    head = ("VM", "TX bytes", "TX budget", "RX bytes", "RX budget")
    click.echo(f"{head[0]:<24}" + "".join(f" {h:>16}" for h in head[1:]) + "  capped")
    for r in rows:
        cells = [r["tx"], r["budget_tx"], r["rx"], r["budget_rx"]]
        text = "".join(f" {'-' if c is None else c!s:>16}" for c in cells)
        click.echo(f"{r['name']!s:<24}{text}  {'yes' if r['capped'] else 'no'}")
