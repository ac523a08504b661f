"""``vhostmdctl``: the operator's command (a click group); it reads the state directory.

The group owns the global options (``--state-dir``, ``--daemon``); each
command family is a module of its own: vhostmd_py.ctl.history (``list``,
``history``, ``graph``) and vhostmd_py.ctl.monitors (``alarms``, ``usage``).
No running daemon is needed.
"""

from __future__ import annotations

import click

from vhostmd_py import __version__
from vhostmd_py.config import DEFAULT_STATE_DIR
from vhostmd_py.ctl.history import graph_cmd, history_cmd, list_cmd
from vhostmd_py.ctl.monitors import alarms_command, usage_command
from vhostmd_py.ctl.policy import policy_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="vhostmdctl",
                      message="%(prog)s (vhostmd-py) %(version)s")
@click.option(
    "--state-dir",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    envvar="VHOSTMD_STATE_DIR",
    help="The daemon's state directory (<history>, <alarms>, <accounting> state_dir).",
)
@click.option(
    "--daemon",
    "rrdcached",
    default=None,
    metavar="ADDR",
    help="rrdcached address to flush through (default: the daemon's, from the index).",
)
@click.pass_context
def main(ctx: click.Context, state_dir: str, rrdcached: str | None) -> None:
    """What vhostmd recorded: history and graphs, alarms, network usage (no daemon needed)."""
    ctx.obj = (state_dir, rrdcached)


for _command in (list_cmd, history_cmd, graph_cmd, alarms_command, usage_command,
                 policy_command):
    main.add_command(_command)

__all__ = ["main"]

if __name__ == "__main__":
    main()
