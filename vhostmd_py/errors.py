"""The exception hierarchy of vhostmd_py: every error we raise is a VhostmdError.

VhostmdError is vhostmd_wire's root, so host and guest errors share it;
each class passes (reason, message) to it.

Fields are structured (file, line, metric, vm, path) so callers and logs
can say exactly what failed without parsing messages.
"""

from __future__ import annotations

import os

# The one root of host and guest errors (reason field; str() is the message),
# and the metrics disk errors of the wire format, re-exported so host code
# imports every error from here.
from vhostmd_wire.errors import (
    ChecksumError,
    ContentTooLargeError,
    DiskBusyError,
    DiskError,
    DiskFormatError,
    DiskIOError,
    DiskSizeError,
    DocumentError,
    StrPath,
    VhostmdError,
    checksum_mismatch,
)

__all__ = [
    "ActionError",
    "ChecksumError",
    "ConfigError",
    "ContentTooLargeError",
    "DiskBusyError",
    "DiskError",
    "DiskFormatError",
    "DiskIOError",
    "DiskSizeError",
    "DocumentError",
    "IdentityError",
    "LibvirtError",
    "PidFileError",
    "PrivilegeError",
    "StrPath",
    "VhostmdError",
    "checksum_mismatch",
]


# --- configuration -----------------------------------------------------------


class ConfigError(VhostmdError):
    """A configuration file that cannot be used; names the file and line."""

    def __init__(self, file: StrPath, reason: str, line: int | None = None) -> None:
        self.file = os.fspath(file)
        self.line = line
        where = self.file if line is None else f"{self.file}:{line}"
        super().__init__(reason, f"{where}: {reason}")


# --- actions, libvirt, daemon --------------------------------------------------


class ActionError(VhostmdError):
    """A metric's action failed (exit status, timeout, bad output)."""

    def __init__(self, metric: str, reason: str, vm: str | None = None) -> None:
        self.metric = metric
        self.vm = vm
        who = f"metric {metric}" if vm is None else f"metric {metric} of VM {vm}"
        super().__init__(reason, f"{who}: {reason}")


class LibvirtError(VhostmdError):
    """libvirt cannot be reached or answered with an error."""

    def __init__(self, uri: str | None, reason: str, *, code: int | None = None) -> None:
        self.uri = uri
        self.code = code  # libvirt's error code (virErrorNumber), when libvirt gave one
        super().__init__(reason, f"libvirt {uri or '(default URI)'}: {reason}")


class PidFileError(VhostmdError):
    """The pid file cannot be created (another daemon holds it, or no access)."""

    def __init__(self, path: StrPath, reason: str, errno: int | None = None) -> None:
        self.path = os.fspath(path)
        self.errno = errno
        super().__init__(reason, f"Failed to open pid file '{self.path}' : {reason}")


class PrivilegeError(VhostmdError):
    """Dropping root privileges (-u USER) is impossible or was refused."""

    def __init__(self, user: str, reason: str) -> None:
        self.user = user
        super().__init__(reason, f"cannot run as user '{user}': {reason}")


# --- alarms and accounting (vhostmd-py extension) ---------------------------------


class StateFileError(VhostmdError):
    """A state file (alarms, accounting) cannot be read or written atomically."""

    def __init__(self, path: StrPath, reason: str, errno: int | None = None) -> None:
        self.path = os.fspath(path)
        self.errno = errno
        super().__init__(reason, f"state file {self.path}: {reason}")


class ShapingError(VhostmdError):
    """libvirt refused to read or change a VM interface's bandwidth parameters."""

    def __init__(self, vm: str, device: str, reason: str, *, gone: bool = False) -> None:
        self.vm = vm
        self.device = device
        self.gone = gone  # the domain (or the interface) no longer exists
        super().__init__(reason, f"VM {vm} interface {device}: {reason}")


# --- freshness and identity (vhostmd-py extension) --------------------------------


class IdentityError(VhostmdError):
    """The host identity's key or host id cannot be read or created."""

    def __init__(self, path: StrPath, reason: str, errno: int | None = None) -> None:
        self.path = os.fspath(path)
        self.errno = errno
        super().__init__(reason, f"host identity {self.path}: {reason}")
