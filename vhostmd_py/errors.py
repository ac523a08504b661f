"""The exception hierarchy of vhostmd_py: every error we raise is a VhostmdError.

Fields are structured (file, line, metric, vm, path) so callers and logs
can say exactly what failed without parsing messages.
"""

from __future__ import annotations

import os
from typing import Union

StrPath = Union[str, "os.PathLike[str]"]


class VhostmdError(Exception):
    """Base class of every vhostmd_py error."""


# --- configuration -----------------------------------------------------------


class ConfigError(VhostmdError):
    """A configuration file that cannot be used; names the file and line."""

    def __init__(self, file: StrPath, reason: str, line: int | None = None) -> None:
        self.file = os.fspath(file)
        self.line = line
        self.reason = reason
        where = self.file if line is None else f"{self.file}:{line}"
        super().__init__(f"{where}: {reason}")


# --- metrics disk ------------------------------------------------------------


class DiskError(VhostmdError):
    """Something is wrong with a metrics disk (host or guest side)."""

    def __init__(self, path: StrPath, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DiskSizeError(DiskError):
    """Configured disk size outside 1024 bytes .. 256 MiB."""

    def __init__(self, path: StrPath, size: int) -> None:
        self.size = size
        super().__init__(
            path, f"metrics disk size {size} not within supported range 1024 - 268435456"
        )


class ContentTooLargeError(DiskError):
    """The metrics document does not fit the disk; the previous one stays readable."""

    def __init__(self, path: StrPath, length: int, capacity: int) -> None:
        self.length = length
        self.capacity = capacity
        super().__init__(
            path, f"metrics document of {length} bytes is larger than the disk's {capacity} bytes"
        )


class DiskFormatError(DiskError):
    """The disk does not hold a valid mvbd image (signature, length, short file)."""


def checksum_mismatch(expected: int, actual: int) -> str:
    """The wording of a checksum mismatch, host and guest alike."""
    return f"checksum mismatch: header says {expected:#010x}, content sums to {actual:#010x}"


class ChecksumError(DiskFormatError):
    """Header checksum does not match the content."""

    def __init__(self, path: StrPath, expected: int, actual: int) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(path, checksum_mismatch(expected, actual))


class DiskBusyError(DiskError):
    """The busy flag stayed set (or the disk kept changing) for longer than allowed."""

    def __init__(self, path: StrPath, waited: float) -> None:
        self.waited = waited
        super().__init__(path, f"metrics disk still busy or changing after {waited:.1f} s")


class DiskIOError(DiskError):
    """An OS-level failure opening, reading or writing a disk (see __cause__)."""

    def __init__(self, path: StrPath, reason: str, errno: int | None = None) -> None:
        self.errno = errno
        super().__init__(path, reason)


# --- actions, libvirt, daemon --------------------------------------------------


class ActionError(VhostmdError):
    """A metric's action failed (exit status, timeout, bad output)."""

    def __init__(self, metric: str, reason: str, vm: str | None = None) -> None:
        self.metric = metric
        self.vm = vm
        self.reason = reason
        who = f"metric {metric}" if vm is None else f"metric {metric} of VM {vm}"
        super().__init__(f"{who}: {reason}")


class LibvirtError(VhostmdError):
    """libvirt cannot be reached or answered with an error."""

    def __init__(self, uri: str | None, reason: str) -> None:
        self.uri = uri
        self.reason = reason
        super().__init__(f"libvirt {uri or '(default URI)'}: {reason}")


class PidFileError(VhostmdError):
    """The pid file cannot be created (another daemon holds it, or no access)."""

    def __init__(self, path: StrPath, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"Failed to open pid file '{self.path}' : {reason}")


class ChannelError(VhostmdError):
    """A virtio-serial channel failed (connect, protocol)."""

    def __init__(self, path: StrPath, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"channel {self.path}: {reason}")


class PrivilegeError(VhostmdError):
    """Dropping root privileges (-u USER) is impossible or was refused."""

    def __init__(self, user: str, reason: str) -> None:
        self.user = user
        self.reason = reason
        super().__init__(f"cannot run as user '{user}': {reason}")


# --- alarms and accounting (vhostmd-py extension, issue 14) -------------------


class StateFileError(VhostmdError):
    """A state file (alarms, accounting) cannot be read or written atomically."""

    def __init__(self, path: StrPath, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"state file {self.path}: {reason}")


class ShapingError(VhostmdError):
    """libvirt refused to read or change a VM interface's bandwidth parameters."""

    def __init__(self, vm: str, device: str, reason: str, *, gone: bool = False) -> None:
        self.vm = vm
        self.device = device
        self.reason = reason
        self.gone = gone  # the domain (or the interface) no longer exists
        super().__init__(f"VM {vm} interface {device}: {reason}")
