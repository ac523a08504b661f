"""The guest side's exception hierarchy: every error vhostmd_guest raises is a MetricsError.

Fields are structured (path, port, name, context, uuid, errno ...) so callers can
act on them without parsing messages. Errors from the shared disk format
(vhostmd_py.errors) are wrapped here with ``raise ... from err`` so a guest
program only ever has to catch MetricsError.
"""

from __future__ import annotations

import os
from typing import Sequence, Tuple

from vhostmd_py.errors import StrPath as StrPath  # re-exported for this package
from vhostmd_py.errors import checksum_mismatch


class MetricsError(Exception):
    """Base class of every vhostmd_guest error."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


# --- metrics disk ------------------------------------------------------------


class MetricsDiskError(MetricsError):
    """The metrics disk cannot be used; names the disk."""

    def __init__(self, path: StrPath, reason: str) -> None:
        self.path = os.fspath(path)
        super().__init__(reason)

    def __str__(self) -> str:
        return f"metrics disk {self.path}: {self.reason}"


class DiskNotFoundError(MetricsDiskError):
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


class DiskBusyTimeoutError(MetricsDiskError):
    """The busy flag stayed set (or the disk kept changing) longer than the limit."""

    def __init__(self, path: StrPath, waited: float) -> None:
        self.waited = waited
        super().__init__(
            path,
            f"still busy (being written) after {waited:.1f} s; "
            "the host's writer may be stuck (raise --busy-timeout to wait longer)",
        )


class DiskChecksumError(MetricsDiskError):
    """The header checksum does not match the content read."""

    def __init__(self, path: StrPath, expected: int, actual: int) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(path, checksum_mismatch(expected, actual))


class DiskFormatError(MetricsDiskError):
    """Not a usable mvbd image: signature, length beyond the device, short file."""


class DiskIOError(MetricsDiskError):
    """The OS refused to open or read the disk (see errno and __cause__)."""

    def __init__(self, path: StrPath, reason: str, errno: int | None = None) -> None:
        self.errno = errno
        super().__init__(path, reason)


# --- the document ------------------------------------------------------------


class DocumentError(MetricsError):
    """The metrics document is not well-formed, too large, or uses forbidden XML."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        super().__init__(reason)

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


# --- virtio ------------------------------------------------------------------


class VirtioError(MetricsError):
    """The virtio-serial port failed: open, write, read or a bad reply."""

    def __init__(self, port: StrPath, reason: str, errno: int | None = None) -> None:
        self.port = os.fspath(port)
        self.errno = errno
        super().__init__(reason)

    def __str__(self) -> str:
        return f"virtio port {self.port}: {self.reason}"


class VirtioOpenError(VirtioError):
    """The port cannot be opened (missing device, permissions ...; see errno)."""

    def __init__(self, port: StrPath, strerror: str, errno: int | None = None) -> None:
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

    def __init__(self, name: str, context: str, vm_uuid: str | None = None) -> None:
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

    def __init__(self, path: str | None, reason: str, errno: int | None = None) -> None:
        self.path = path
        self.errno = errno
        super().__init__(reason)
