"""The host's metrics disk: THE binding of the compiled vhostmd_py.publish._mdisk (csrc/mdisk.c).

Only what crosses into C is here: checksum, header packing and the publish
sequence run in csrc/mdisk.c, on file descriptors. The file itself (safe
creation, lock, mode, allocation, its path re-checked each cycle) is
vhostmd_py.publish.diskfile. The format (constants, Header, Status, the
pure-Python reference the tests compare this binding against) is
vhostmd_wire.disk; the byte layout is described there once. C status codes
become the typed errors of vhostmd_wire.errors.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import os
from typing import Any, Union

from vhostmd_wire.disk import (
    ALIGN,
    HEADER_SIZE,
    MAX_DISK_SIZE,
    MIN_DISK_SIZE,
    SIGNATURE,
    UPSTREAM_READ_BLOCK,
    Header,
    Status,
)
from vhostmd_wire.errors import ContentTooLargeError, DiskFormatError, DiskIOError, StrPath

from vhostmd_py.publish._mdisk import ffi, lib
from vhostmd_py.publish.diskfile import DiskFile, Inode

__all__ = [
    "ALIGN",
    "HEADER_SIZE",
    "MAX_DISK_SIZE",
    "MIN_DISK_SIZE",
    "SIGNATURE",
    "UPSTREAM_READ_BLOCK",
    "Header",
    "MetricsDisk",
    "Status",
    "checksum",
    "pack_header",
    "unpack_header",
]

log = logging.getLogger(__name__)

BytesLike = Union[bytes, bytearray, memoryview]


def _cbytes(data: BytesLike) -> Any:
    # bytes go to C without a copy; other buffers through from_buffer (no copy either).
    if isinstance(data, bytes):
        return data
    return ffi.from_buffer("unsigned char[]", data)


def checksum(data: BytesLike) -> int:
    """Signed-char sum of data modulo 2**32 (vhostmd_wire.disk explains why signed)."""
    return int(lib.mdisk_checksum(_cbytes(data), len(data)))


def pack_header(h: Header) -> bytes:
    """The 16 header bytes of h."""
    ch = ffi.new(
        "struct mdisk_header *",
        {"signature": h.signature, "busy": h.busy, "checksum": h.checksum, "length": h.length},
    )
    out = ffi.new("unsigned char[]", HEADER_SIZE)
    lib.mdisk_header_pack(ch, out)
    return bytes(ffi.buffer(out, HEADER_SIZE))


def _header_of(ch: Any) -> Header:
    return Header(int(ch.signature), int(ch.busy), int(ch.checksum), int(ch.length))


def unpack_header(raw: BytesLike) -> Header:
    """The Header in the first 16 bytes of raw."""
    if len(raw) < HEADER_SIZE:
        raise DiskFormatError("<memory>", f"need {HEADER_SIZE} header bytes, got {len(raw)}")
    ch = ffi.new("struct mdisk_header *")
    lib.mdisk_header_unpack(_cbytes(raw), ch)
    return _header_of(ch)


class MetricsDisk:
    """The host's metrics disk, open for publishing (C publish path).

    Before every publish the path is checked (vhostmd_py.publish.diskfile.
    DiskFile.revalidate): a disk deleted or replaced is re-created at its
    path and the old inode keeps receiving every document for the guests
    that still have it open.
    """

    def __init__(self, file: DiskFile) -> None:
        """Wrap a DiskFile just created (busy=1, zeros); use create() instead."""
        self._file = file
        self.path = file.path
        self._closed = False
        self._busy = True  # creation leaves busy=1 until the first publish
        self._owner_pid = os.getpid()

    @classmethod
    def create(cls, path: StrPath, size: int) -> MetricsDisk:
        """Create or truncate the disk: zeros to size, header busy=1."""
        return cls(DiskFile(path, size, pack_header(Header(SIGNATURE, 1, 0, 0))))

    @property
    def size(self) -> int:
        """The disk's size in bytes."""
        return self._file.size

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed

    @property
    def old_inodes(self) -> int:
        """How many replaced inodes still receive the documents."""
        return len(self._file.old)

    def fileno(self) -> int:
        """The open file descriptor (the daemon keeps it across a privilege drop)."""
        self._check_open()
        return self._file.current.fd

    def _check_open(self) -> None:
        if self._closed:
            raise DiskIOError(self.path, "metrics disk is closed", errno_mod.EBADF)

    def revalidate(self) -> None:
        """Make the path name our disk again and give it its size back (each cycle)."""
        self._check_open()
        self._file.revalidate()

    def resize(self, size: int) -> None:
        """Give the open disk SIZE bytes (a reload); DiskIOError, nothing changed, if no room."""
        self._check_open()
        self._file.resize(size, self._cut)

    def _cut(self, inode: Inode) -> None:
        # The document no longer fits: busy until the next publish.
        lib.mdisk_set_busy(inode.fd, 1)
        self._busy = True
        inode.written = 0

    def publish(self, content: bytes) -> None:
        """Write content as the new document; too large -> error, old one stays."""
        self._check_open()
        self._file.revalidate()
        size = self._file.size
        length = len(content)
        if HEADER_SIZE + length > size:
            raise ContentTooLargeError(self.path, length, size - HEADER_SIZE)
        data = _cbytes(content)
        for old in self._file.old:
            rc = int(lib.mdisk_publish(old.fd, data, length, size, HEADER_SIZE + old.written))
            old.written = length if rc == Status.OK else max(old.written, length)
        inode = self._file.current
        rc = int(lib.mdisk_publish(inode.fd, data, length, size, HEADER_SIZE + inode.written))
        if rc == Status.OK:
            inode.written = length
            self._busy = False
            return
        if rc == Status.TOOLARGE:  # the size check above makes this unreachable
            raise ContentTooLargeError(self.path, length, size - HEADER_SIZE)
        # Failed midway: part of the new content may be on the disk, so clear
        # up to the longer of the two next time; keep "busy" so close() tries
        # once more to clear it.
        inode.written = max(inode.written, length)
        self._busy = True
        code = -rc if rc < 0 else errno_mod.EIO
        err = OSError(code, os.strerror(code))
        raise DiskIOError(self.path, f"publishing failed: {err.strerror}", code) from err

    def close(self) -> None:
        """Close the disk, clearing busy if no publish ever completed."""
        if self._closed:
            return
        self._closed = True
        self._file.close_old()
        try:
            if self._busy:
                rc = int(lib.mdisk_set_busy(self._file.current.fd, 0))
                if rc != Status.OK:
                    log.error("%s: cannot clear the busy flag: %s", self.path, os.strerror(-rc))
        finally:
            self._file.close()

    def __enter__(self) -> MetricsDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten disk must not keep its fd nor leave busy set; but a
        # forked child's copy must never write to the parent's disk.
        if not getattr(self, "_closed", True) and getattr(self, "_owner_pid", None) == os.getpid():
            self.close()
