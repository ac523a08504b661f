"""The one exception root of vhostmd, host and guest: every error either side raises is a
VhostmdError, with a ``reason`` and structured fields (path, expected, errno ...).

The disk and document errors live here because both sides raise them: the
host when it creates or publishes a disk, the guest when it reads one.
"""

import os
from typing import Optional, Union

StrPath = Union[str, "os.PathLike[str]"]


class VhostmdError(Exception):
    """Root of every vhostmd error (host daemon, guest reader, wire format)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)

    def __str__(self) -> str:
        return self.reason


# --- metrics disk ------------------------------------------------------------


class DiskError(VhostmdError):
    """Something is wrong with a metrics disk (host or guest side); names the disk."""

    def __init__(self, path: StrPath, reason: str) -> None:
        self.path = os.fspath(path)
        super().__init__(reason)

    def __str__(self) -> str:
        return "metrics disk {}: {}".format(self.path, self.reason)


class DiskSizeError(DiskError):
    """Configured disk size outside 1024 bytes .. 256 MiB (upstream's range and wording)."""

    def __init__(self, path: StrPath, size: int) -> None:
        self.size = size
        super().__init__(
            path,
            "metrics disk size {} not within supported range 1024 - 268435456".format(size),
        )


class ContentTooLargeError(DiskError):
    """The metrics document does not fit the disk; the previous one stays readable."""

    def __init__(self, path: StrPath, length: int, capacity: int) -> None:
        self.length = length
        self.capacity = capacity
        super().__init__(
            path,
            "metrics document of {} bytes is larger than the disk's {} bytes".format(
                length, capacity
            ),
        )


class DiskFormatError(DiskError):
    """The disk does not hold a valid mvbd image (signature, length, short file)."""


def checksum_mismatch(expected: int, actual: int) -> str:
    """The wording of a checksum mismatch, host and guest alike."""
    return "checksum mismatch: header says {:#010x}, content sums to {:#010x}".format(
        expected, actual
    )


class ChecksumError(DiskFormatError):
    """Header checksum does not match the content."""

    def __init__(self, path: StrPath, expected: int, actual: int) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(path, checksum_mismatch(expected, actual))


class DiskBusyError(DiskError):
    """The busy flag stayed set (or the disk kept changing) for longer than allowed."""

    def __init__(self, path: StrPath, waited: float, reason: Optional[str] = None) -> None:
        self.waited = waited
        super().__init__(
            path,
            reason
            or "still busy (being written) after {:.1f} s; the host's writer may be stuck "
            "(raise --busy-timeout to wait longer)".format(waited),
        )


class DiskIOError(DiskError):
    """An OS-level failure opening, reading or writing a disk (see errno and __cause__)."""

    def __init__(self, path: StrPath, reason: str, errno: Optional[int] = None) -> None:
        self.errno = errno
        super().__init__(path, reason)


# --- the document ------------------------------------------------------------


class DocumentError(VhostmdError):
    """The metrics document is not well-formed, too large, or uses forbidden XML."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        super().__init__(reason)

    def __str__(self) -> str:
        return "{}: {}".format(self.source, self.reason)
