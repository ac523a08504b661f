"""``vhostmdctl``: the operator's command (a click group); it reads the state directory.

The group and its global options (``--state-dir``, ``--daemon``) are the
history's (vhostmd_py.ctl.history: ``list``, ``history``, ``graph``); the
alarms' and accounting's readers (``alarms``, ``usage``) join it here.
"""

from __future__ import annotations

from vhostmd_py.ctl.history import main
from vhostmd_py.ctl.monitors import alarms_command, usage_command

main.add_command(alarms_command)
main.add_command(usage_command)

__all__ = ["main"]

if __name__ == "__main__":
    main()
