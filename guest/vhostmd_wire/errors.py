"""The one exception root of vhostmd, host and guest: every error either side raises is a
VhostmdError, with a ``reason`` and structured fields (path, expected, errno ...).

The disk and document errors live here because both sides raise them: the
host when it creates or publishes a disk, the guest when it reads one.
"""

import os
from typing import Optional, Union

StrPath = Union[str, "os.PathLike[str]"]


class VhostmdError(Exception):
    """Root of every vhostmd error (host daemon, guest reader, wire format).

    ``reason`` says what went wrong; ``message`` (default: the reason) is
    what str() shows, usually the reason prefixed by what failed.
    """

    def __init__(self, reason: str, message: Optional[str] = None) -> None:
        self.reason = reason
        super().__init__(reason if message is None else message)


# --- metrics disk ------------------------------------------------------------


class DiskError(VhostmdError):
    """Something is wrong with a metrics disk (host or guest side); names the disk."""

    def __init__(self, path: StrPath, reason: str) -> None:
        self.path = os.fspath(path)
        super().__init__(reason, f"metrics disk {self.path}: {reason}")


class DiskSizeError(DiskError):
    """Configured disk size outside 1024 bytes .. 256 MiB (upstream's range and wording)."""

    def __init__(self, path: StrPath, size: int) -> None:
        self.size = size
        super().__init__(
            path,
            f"metrics disk size {size} not within supported range 1024 - 268435456",
        )


class ContentTooLargeError(DiskError):
    """The metrics document does not fit the disk; the previous one stays readable."""

    def __init__(self, path: StrPath, length: int, capacity: int) -> None:
        self.length = length
        self.capacity = capacity
        super().__init__(
            path,
            f"metrics document of {length} bytes is larger than the disk's {capacity} bytes",
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

    def __init__(self, path: StrPath, waited: float, reason: Optional[str] = None) -> None:
        self.waited = waited
        super().__init__(
            path,
            reason
            or f"still busy (being written) after {waited:.1f} s; the host's writer may be "
            "stuck (raise --busy-timeout to wait longer)",
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
        super().__init__(reason, f"{source}: {reason}")
