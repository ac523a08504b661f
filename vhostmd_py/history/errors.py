"""Errors of the history (RRD store, state directory, vhostmdctl); all VhostmdErrors."""

from __future__ import annotations

import os

from vhostmd_py.errors import StrPath, VhostmdError


class HistoryError(VhostmdError):
    """The history cannot read or write its state (names the path and the reason)."""

    def __init__(self, path: StrPath, reason: str, errno: int | None = None) -> None:
        self.path = os.fspath(path)
        self.errno = errno
        super().__init__(reason, f"{self.path}: {reason}")


class StateDirError(HistoryError):
    """The state directory does not exist (yet) or is not a usable directory."""


class UnknownVmError(HistoryError):
    """No history for this VM name or UUID in the state directory."""

    def __init__(self, path: StrPath, vm: str, known: int) -> None:
        self.vm = vm
        self.known = known
        super().__init__(
            path, f"no history for VM '{vm}' ({known} VMs known; try 'vhostmdctl list')"
        )


class UnknownMetricError(HistoryError):
    """A metric name the history does not record for this kind of file."""

    def __init__(self, path: StrPath, metric: str, choices: str) -> None:
        self.metric = metric
        self.choices = choices
        super().__init__(path, f"unknown metric '{metric}' (choose from {choices})")
