"""``vhostmdctl policy``: each VM's policy in force and its alarm variables, with their origins.

Reads ``policy.json`` in the state directory, written atomically by the
daemon whenever a VM's effective policy or alarm variables change (a VM
started or gone, a reload, a domain's metadata changed), so it works while
the daemon runs, as any user allowed to read the directory.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import click

from vhostmd_py.config.policy import POLICY_FILE
from vhostmd_py.ctl.monitors import _read, _state_dir


def _listed(values: Any) -> str:
    return ", ".join(str(v) for v in values) if values else "-"


@click.command("policy")
@click.option(
    "--state-dir",
    default=None,
    help="The daemon's state directory (default: vhostmdctl --state-dir).",
)
@click.option("--vm", "vms", multiple=True, help="Only this VM (name or UUID; repeatable).")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True
)
def policy_command(state_dir: str | None, vms: tuple[str, ...], fmt: str) -> None:
    """What each running VM may see, its alarm variables, and where each came from."""
    data = _read(os.path.join(_state_dir(state_dir), POLICY_FILE))
    rows: List[Dict[str, Any]] = []
    for uuid, entry in sorted(
        (data.get("vms") or {}).items(), key=lambda item: str(item[1].get("name", ""))
    ):
        if vms and uuid not in vms and entry.get("name") not in vms:
            continue
        rows.append({"uuid": uuid, **entry})
    if vms and not rows:
        raise click.ClickException(f"no policy for {', '.join(vms)} (not running?)")
    if fmt == "json":
        click.echo(json.dumps({"vms": rows}, indent=1, sort_keys=True))
        return
    for row in rows:
        origin = row.get("origin") or {}
        click.echo(f"{row.get('name')} ({row['uuid']})")
        for flag in ("blocked", "shared"):
            said = "yes" if row.get(flag) else "no"
            click.echo(f"  {flag:<8} {said:<5}  from {origin.get(flag, '-')}")
        click.echo(f"  allow    {_listed(row.get('allow'))}  from {origin.get('allow', '-')}")
        click.echo(f"  deny     {_listed(row.get('deny'))}  from {origin.get('deny', '-')}")
        alarms = row.get("alarms") or []
        if not alarms:
            click.echo("  alarms   -")
        for alarm in alarms:
            click.echo(f"  alarm    {alarm.get('name')}  from {alarm.get('origin')}")
