"""A metrics-disk writer for guest and wire tests that runs without the host package.

It writes what vhostmd_wire.disk.published_image says a publish leaves, in
the host's order (header with busy=1, the content and the cleared tail,
then the header with busy=0), so a concurrent reader sees the same
intermediate states as with the daemon's C writer. Python 3.6+ (pypy3 runs
the guest tests with it).
"""

import os
from typing import Union

from vhostmd_wire import disk

PathLike = Union[str, "os.PathLike[str]"]


class DiskWriter:
    """A metrics disk file, created zeroed with busy=1, published like the host does."""

    def __init__(self, path: PathLike, size: int = 65536) -> None:
        self.path = os.fspath(path)
        self.size = size
        self._prev = 0
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        os.pwrite(self._fd, disk.created_image(size), 0)

    @classmethod
    def create(cls, path: PathLike, size: int = 65536) -> "DiskWriter":
        """The same spelling as the host's MetricsDisk.create."""
        return cls(path, size)

    def publish(self, content: bytes) -> None:
        """Write content as the new document (ValueError when it does not fit)."""
        old = os.pread(self._fd, self.size, 0)
        image = disk.published_image(old, content, self._prev)
        end = max(disk.HEADER_SIZE + len(content), disk.HEADER_SIZE + self._prev)
        busy = disk.pack_header(disk.unpack_header(image)._replace(busy=1))
        os.pwrite(self._fd, busy, 0)
        os.pwrite(self._fd, image[disk.HEADER_SIZE : end], disk.HEADER_SIZE)
        os.pwrite(self._fd, image[: disk.HEADER_SIZE], 0)
        self._prev = len(content)

    def close(self) -> None:
        """Close the file (the last document stays readable)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "DiskWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_disk(path: PathLike, content: bytes, size: int = 65536) -> None:
    """A disk file at path holding content, published once."""
    with DiskWriter(path, size) as writer:
        writer.publish(content)
