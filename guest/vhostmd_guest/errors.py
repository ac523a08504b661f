"""The guest side's exception hierarchy: every error vhostmd_guest raises is a MetricsError.

MetricsError is the wire format's root (vhostmd_wire.errors.VhostmdError),
the root of the host's errors too; the disk and document errors are the
wire format's own classes under their guest names, so nothing is
translated. Fields are structured (path, port, name, context, uuid, errno
...) so callers can act on them without parsing messages.
"""

import os
from typing import Optional, Sequence, Tuple

from vhostmd_wire.errors import (
    ChecksumError,
    DiskBusyError,
    DiskError,
    DiskFormatError,
    DiskIOError,
    DocumentError,
    StrPath,
    VhostmdError,
)

__all__ = [
    "DestinationError",
    "DiskBusyTimeoutError",
    "DiskChecksumError",
    "DiskFormatError",
    "DiskIOError",
    "DiskNotFoundError",
    "DocumentError",
    "InvalidReplyError",
    "MetricNotFoundError",
    "MetricValueError",
    "MetricsDiskError",
    "MetricsError",
    "ReplyTooLargeError",
    "StrPath",
    "VirtioBusyError",
    "VirtioError",
    "VirtioOpenError",
    "VirtioTimeoutError",
    "VmIdentityError",
    "XenstoreError",
    "XenstoreUnavailableError",
]


# The guest's historical names for the wire format's errors: the same
# classes, so a disk or document error raised by vhostmd_wire is caught as
# what guest programs have always caught.
MetricsError = VhostmdError
MetricsDiskError = DiskError
DiskBusyTimeoutError = DiskBusyError
DiskChecksumError = ChecksumError


class DiskNotFoundError(DiskError):
    """No block device under <sys_root>/block carries the mvbd signature."""

    def __init__(self, sys_root: StrPath, dev_root: StrPath, probed: Sequence[str]) -> None:
        self.sys_root = os.fspath(sys_root)
        self.dev_root = os.fspath(dev_root)
        self.probed: Tuple[str, ...] = tuple(probed)
        what = ", ".join(self.probed) if self.probed else "no block devices"
        super().__init__(
            os.path.join(self.sys_root, "block"),
            f"no device with the mvbd signature found (probed: {what})",
        )

    def __str__(self) -> str:
        return f"no metrics disk found in {self.path}: {self.reason}"


# --- virtio ------------------------------------------------------------------


class VirtioError(MetricsError):
    """The virtio-serial port failed: open, write, read or a bad reply."""

    def __init__(self, port: StrPath, reason: str, errno: Optional[int] = None) -> None:
        self.port = os.fspath(port)
        self.errno = errno
        super().__init__(reason)

    def __str__(self) -> str:
        return f"virtio port {self.port}: {self.reason}"


class VirtioOpenError(VirtioError):
    """The port cannot be opened (missing device, permissions ...; see errno)."""

    def __init__(self, port: StrPath, strerror: str, errno: Optional[int] = None) -> None:
        self.strerror = strerror
        super().__init__(port, f"open: {strerror}", errno)


class VirtioBusyError(VirtioOpenError):
    """Another process holds the port open (open() returned EBUSY)."""

    def __str__(self) -> str:
        return (
            f"virtio port {self.port}: another process holds the port open (only one "
            "reader at a time; a child that inherited the descriptor keeps it busy)"
        )


class VirtioTimeoutError(VirtioError):
    """No complete reply within the timeout (host not connected or silent)."""

    def __init__(self, port: StrPath, timeout: float, received: int) -> None:
        self.timeout = timeout
        self.received = received
        what = "no reply" if received == 0 else f"an incomplete reply ({received} bytes)"
        super().__init__(port, f"{what} within {timeout:g} s (is vhostmd running on the host?)")


class ReplyTooLargeError(VirtioError):
    """The host's reply exceeded the size limit; it was refused, not buffered further."""

    def __init__(self, port: StrPath, limit: int) -> None:
        self.limit = limit
        super().__init__(port, f"reply larger than {limit} bytes refused")


class InvalidReplyError(VirtioError):
    """The host answered something other than a metrics document."""


# --- xenstore ----------------------------------------------------------------


class XenstoreError(MetricsError):
    """Reading the metrics from xenstore failed."""


class XenstoreUnavailableError(XenstoreError):
    """The xenstore command-line tools are not installed (not a Xen guest?)."""


# --- lookups -------------------------------------------------------------------


class MetricNotFoundError(MetricsError):
    """No metric of that name in that context (for that VM)."""

    def __init__(self, name: str, context: str, vm_uuid: Optional[str] = None) -> None:
        self.name = name
        self.context = context
        self.vm_uuid = vm_uuid
        where = f"context {context}" if vm_uuid is None else f"context {context}, VM {vm_uuid}"
        super().__init__(f"no metric {name!r} in {where}")


class MetricValueError(MetricsError):
    """A metric's value does not fit its declared type (or the type is unknown)."""

    def __init__(self, name: str, type_name: str, value: str, reason: str) -> None:
        self.name = name
        self.type_name = type_name
        self.value = value
        shown = value if len(value) <= 40 else value[:37] + "..."
        super().__init__(f"metric {name!r} of type {type_name!r}, value {shown!r}: {reason}")


class VmIdentityError(MetricsError):
    """The document holds several VMs and this VM's UUID is unknown or absent."""

    def __init__(self, reason: str, uuids: Sequence[str] = ()) -> None:
        self.uuids: Tuple[str, ...] = tuple(uuids)
        super().__init__(reason)


# --- output ------------------------------------------------------------------


class DestinationError(MetricsError):
    """The metrics could not be written to the destination file or stdout."""

    def __init__(self, path: Optional[str], reason: str, errno: Optional[int] = None) -> None:
        self.path = path
        self.errno = errno
        super().__init__(reason)
