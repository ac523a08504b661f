"""The host's metrics disk: THE binding of the compiled vhostmd_py._mdisk (csrc/mdisk.c).

The host publishes through C only: checksum, header packing and the publish
sequence run in csrc/mdisk.c; creating the file (directory, mode, the busy
header first, truncation, zero fill) is OS plumbing done here in Python.
The format itself (constants, Header, Status, the pure-Python reference
implementation the tests compare this binding against) is vhostmd_wire.disk;
the byte layout is described there once. C status codes become the typed
errors of vhostmd_wire.errors.

CReadStrategy plugs C's single stable-read attempt into the wire's one
retry policy (vhostmd_wire.disk.DiskReader), for tests and benchmarks.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import os
import stat
from typing import Any, Union

from vhostmd_wire.disk import (
    ALIGN,
    HEADER_SIZE,
    MAX_DISK_SIZE,
    MIN_DISK_SIZE,
    SIGNATURE,
    UPSTREAM_READ_BLOCK,
    AttemptResult,
    Header,
    Status,
    check_disk_size,
    device_size,
)
from vhostmd_wire.errors import ContentTooLargeError, DiskFormatError, DiskIOError, StrPath

from vhostmd_py._mdisk import ffi, lib

__all__ = [
    "ALIGN",
    "HEADER_SIZE",
    "MAX_DISK_SIZE",
    "MIN_DISK_SIZE",
    "SIGNATURE",
    "UPSTREAM_READ_BLOCK",
    "CReadStrategy",
    "Header",
    "MetricsDisk",
    "Status",
    "checksum",
    "create_disk_file",
    "pack_header",
    "unpack_header",
]

log = logging.getLogger(__name__)

BytesLike = Union[bytes, bytearray, memoryview]

_ZERO_CHUNK = bytes(65536)


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


# --- creation: OS plumbing ----------------------------------------------------------


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)  # EINTR is retried by Python (PEP 475)
        if n <= 0:
            raise OSError(errno_mod.EIO, "pwrite wrote nothing")
        view = view[n:]
        offset += n


def _pwrite_zeros(fd: int, start: int, end: int) -> None:
    while start < end:
        chunk = min(len(_ZERO_CHUNK), end - start)
        _pwrite_all(fd, _ZERO_CHUNK[:chunk], start)
        start += chunk


def _refuse_special(path: str, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise DiskIOError(path, "is a directory, not a metrics disk", errno_mod.EISDIR)
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise DiskIOError(path, "exists and is not a regular file or block device")


def create_disk_file(path: StrPath, size: int, first_header: bytes) -> int:
    """SPEC 4 creation: parent dir, mode 0644, busy header, old content gone, zeros; the fd.

    The busy header is written BEFORE the old content is dropped (not O_TRUNC
    first, as upstream does), so a guest reading while the daemon restarts
    sees "busy" and waits instead of failing on an empty or zeroed disk.
    O_NOFOLLOW: the daemon runs as root in world-writable /dev/shm, where a
    planted symlink must not make it truncate another file.
    """
    check_disk_size(path, size)
    spath = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(spath))
    if not os.path.isdir(parent):
        # Only the last component, like upstream (FACTS 5 disk-dir-missing).
        try:
            os.mkdir(parent, 0o755)
        except FileExistsError:
            pass
        except OSError as err:
            raise DiskIOError(
                spath, f"cannot create directory {parent}: {err.strerror}", err.errno
            ) from err
    try:
        _refuse_special(spath, os.stat(spath).st_mode)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise DiskIOError(spath, f"cannot stat: {err.strerror}", err.errno) from err
    try:
        fd = os.open(spath, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno_mod.ELOOP:
            raise DiskIOError(
                spath, "is a symbolic link: refusing to follow it", err.errno
            ) from err
        raise DiskIOError(spath, f"cannot create: {err.strerror}", err.errno) from err
    try:
        st = os.fstat(fd)
        _refuse_special(spath, st.st_mode)  # it may have changed since the stat
        if stat.S_ISREG(st.st_mode):
            os.fchmod(fd, 0o644)  # whatever the umask or the old file's mode
            _pwrite_all(fd, first_header, 0)
            os.ftruncate(fd, HEADER_SIZE)  # the old content goes...
            os.ftruncate(fd, size)  # ...and this zero-fills to the size
        else:
            have = device_size(fd, spath)
            if have < size:
                raise DiskIOError(spath, f"block device of {have} bytes is smaller than {size}")
            _pwrite_all(fd, first_header, 0)
            _pwrite_zeros(fd, HEADER_SIZE, size)
    except OSError as err:
        os.close(fd)
        raise DiskIOError(spath, f"cannot initialise: {err.strerror}", err.errno) from err
    except BaseException:
        os.close(fd)
        raise
    return fd


# --- the writer -------------------------------------------------------------------


class MetricsDisk:
    """The host's metrics disk, open for publishing (C publish path)."""

    def __init__(self, path: StrPath, size: int, fd: int) -> None:
        """Wrap an fd prepared by create(); use create() instead."""
        self.path = os.fspath(path)
        self.size = size
        self._fd = fd
        # create() zero-filled the disk, so nothing stale lies beyond 16+0.
        self._prev_length = 0
        self._busy = True  # create() leaves busy=1 until the first publish
        self._owner_pid = os.getpid()

    @classmethod
    def create(cls, path: StrPath, size: int) -> MetricsDisk:
        """Create or truncate the disk (SPEC 4): zeros to size, header busy=1."""
        first = pack_header(Header(SIGNATURE, 1, 0, 0))
        return cls(path, size, create_disk_file(path, size, first))

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._fd < 0

    def fileno(self) -> int:
        """The open file descriptor (the daemon keeps it across a privilege drop)."""
        self._check_open()
        return self._fd

    def _check_open(self) -> None:
        if self._fd < 0:
            raise DiskIOError(self.path, "metrics disk is closed", errno_mod.EBADF)

    def publish(self, content: bytes) -> None:
        """Write content as the new document; too large -> error, old one stays."""
        self._check_open()
        length = len(content)
        if HEADER_SIZE + length > self.size:
            raise ContentTooLargeError(self.path, length, self.size - HEADER_SIZE)
        rc = int(
            lib.mdisk_publish(
                self._fd, _cbytes(content), length, self.size, HEADER_SIZE + self._prev_length
            )
        )
        if rc == Status.OK:
            self._prev_length = length
            self._busy = False
            return
        if rc == Status.TOOLARGE:  # the size check above makes this unreachable
            raise ContentTooLargeError(self.path, length, self.size - HEADER_SIZE)
        # Failed midway: part of the new content may be on the disk, so clear
        # up to the longer of the two next time; keep "busy" so close() tries
        # once more to clear it.
        self._prev_length = max(self._prev_length, length)
        self._busy = True
        code = -rc if rc < 0 else errno_mod.EIO
        err = OSError(code, os.strerror(code))
        raise DiskIOError(self.path, f"publishing failed: {err.strerror}", code) from err

    def close(self) -> None:
        """Close the disk, clearing busy if no publish ever completed."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            if self._busy:
                rc = int(lib.mdisk_set_busy(fd, 0))
                if rc != Status.OK:
                    log.error("%s: cannot clear the busy flag: %s", self.path, os.strerror(-rc))
        finally:
            os.close(fd)

    def __enter__(self) -> MetricsDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten disk must not keep its fd nor leave busy set; but a
        # forked child's copy must never write to the parent's disk.
        if getattr(self, "_fd", -1) >= 0 and getattr(self, "_owner_pid", None) == os.getpid():
            self.close()


# --- C's stable-read attempt, for the wire's retry policy ----------------------------


class CReadStrategy:
    """mdisk_read_stable (csrc/mdisk.c) as a read strategy of vhostmd_wire.disk.DiskReader."""

    def __init__(self) -> None:
        self._ccap = 0
        self._chdr = ffi.new("struct mdisk_header *")
        self.alloc(ALIGN)

    def alloc(self, size: int) -> None:
        """Replace the buffer by a posix_memalign'd one of size bytes."""
        raw = lib.mdisk_buf_alloc(size)
        if raw == ffi.NULL:
            raise MemoryError(f"cannot allocate an aligned buffer of {size} bytes")
        if self._ccap:
            self.free()
        self._cbuf = ffi.gc(raw, lib.mdisk_buf_free)
        self._ccap = size

    def capacity(self) -> int:
        """The buffer's size in bytes."""
        return self._ccap

    def free(self) -> None:
        """Release the buffer."""
        if self._ccap:
            ffi.release(self._cbuf)
            self._ccap = 0

    def attempt(self, fd: int, direct: bool, dev_size: int, want: int) -> AttemptResult:
        """One attempt in C: (Status or -errno, header, content if OK or CHECKSUM)."""
        rc = int(lib.mdisk_read_stable(fd, int(direct), dev_size, self._cbuf, want, self._chdr))
        if rc < 0 or rc in (Status.SHORT, Status.ARG):
            return rc, None, None
        header = _header_of(self._chdr)
        if rc in (Status.OK, Status.CHECKSUM):
            return rc, header, ffi.buffer(self._cbuf + HEADER_SIZE, header.length)[:]
        return rc, header, None
