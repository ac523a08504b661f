"""``vhostmdctl``: the host's inspection commands (a click group).

Minimal here: the alarms branch's ``alarms`` and ``usage``; the history
branch adds ``history`` and ``graph`` to the same group at merge.
"""

from __future__ import annotations

import click

from vhostmd_py.ctl_alarms import alarms_command, usage_command


@click.group()
def main() -> None:
    """Inspect a running vhostmd: alarms, usage."""


main.add_command(alarms_command)
main.add_command(usage_command)
if __name__ == "__main__":
    main()
