"""The metrics disk: THE binding of the compiled vhostmd_py._mdisk (csrc/mdisk.c).

This is the only module that imports the extension. Bytes go in and out;
C status codes become the typed errors of vhostmd_py.errors. The byte
layout is described once, in csrc/mdisk.c. Creating and opening files and
the retry policy are shared with the pure-Python twin (vhostmd_py.mdisk_py),
which has the same public names; only the hot path differs.
"""

from __future__ import annotations

import errno as errno_mod
from typing import Any, Union

from vhostmd_py._mdisk import ffi, lib
from vhostmd_py.errors import DiskFormatError, DiskIOError, StrPath
from vhostmd_py.mdisk_py import (
    ALIGN,
    HEADER_SIZE,
    MAX_DISK_SIZE,
    MIN_DISK_SIZE,
    SIGNATURE,
    UPSTREAM_READ_BLOCK,
    AttemptResult,
    Header,
    Status,
    _header_from_block,
    check_disk_size,
    device_size,
    open_for_read,
    read_first_block,
)
from vhostmd_py.mdisk_py import DiskReader as _PyDiskReader
from vhostmd_py.mdisk_py import MetricsDisk as _PyMetricsDisk

__all__ = [
    "ALIGN",
    "HEADER_SIZE",
    "MAX_DISK_SIZE",
    "MIN_DISK_SIZE",
    "SIGNATURE",
    "UPSTREAM_READ_BLOCK",
    "DiskReader",
    "Header",
    "MetricsDisk",
    "Status",
    "check_disk_size",
    "checksum",
    "device_size",
    "open_for_read",
    "pack_header",
    "read_disk",
    "read_header",
    "unpack_header",
]

BytesLike = Union[bytes, bytearray, memoryview]


def _cbytes(data: BytesLike) -> Any:
    # bytes go to C without a copy; other buffers through from_buffer (no copy either).
    if isinstance(data, bytes):
        return data
    return ffi.from_buffer("unsigned char[]", data)


def checksum(data: BytesLike) -> int:
    """Signed-char sum of data modulo 2**32 (csrc/mdisk.c explains why signed)."""
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


class MetricsDisk(_PyMetricsDisk):
    """The host's metrics disk, open for publishing (C publish path)."""

    @staticmethod
    def _pack(h: Header) -> bytes:
        return pack_header(h)

    def _write(self, content: bytes, clear_to: int) -> int:
        return int(lib.mdisk_publish(self._fd, _cbytes(content), len(content), self.size, clear_to))

    def _clear_busy(self, fd: int) -> int:
        return int(lib.mdisk_set_busy(fd, 0))


class DiskReader(_PyDiskReader):
    """Guest-side stable reader (C read path, posix_memalign'd buffer)."""

    def _alloc(self, size: int) -> None:
        raw = lib.mdisk_buf_alloc(size)
        if raw == ffi.NULL:
            raise DiskIOError(self.path, f"cannot allocate {size} bytes", errno_mod.ENOMEM)
        self._cbuf = ffi.gc(raw, lib.mdisk_buf_free)
        self._ccap = size
        self._chdr = ffi.new("struct mdisk_header *")

    def _capacity(self) -> int:
        return self._ccap

    def _free(self) -> None:
        ffi.release(self._cbuf)
        self._ccap = 0

    def _attempt(self, dev_size: int) -> AttemptResult:
        rc = int(
            lib.mdisk_read_stable(
                self._fd, int(self._direct), dev_size, self._cbuf, self._want, self._chdr
            )
        )
        if rc < 0 or rc in (Status.SHORT, Status.ARG):
            return rc, None, None
        header = _header_of(self._chdr)
        if rc in (Status.OK, Status.CHECKSUM):
            return rc, header, ffi.buffer(self._cbuf + HEADER_SIZE, header.length)[:]
        return rc, header, None

    def _checksum(self, content: bytes) -> int:
        return checksum(content)


def read_header(path: StrPath, *, direct: bool = True) -> Header:
    """The header of the disk at path (any signature: discovery decides)."""
    return _header_from_block(path, read_first_block(path, direct), unpack_header)


read_disk = DiskReader.read_once
