"""Pure-Python twin of the metrics disk binding (same public names as vhostmd_py.mdisk).

The byte layout is described once, in csrc/mdisk.c; this module re-implements
the C hot path (checksum, header packing, the publish sequence, one stable-read
attempt) with struct and os.pwrite/os.preadv so that tests can run both and the
benchmark can compare them.

It also holds what both implementations share and what is not hot: the
constants, the Header type, status codes mirroring csrc/mdisk.h, creating and
opening disk files, and the stable-read retry policy. vhostmd_py.mdisk imports
those from here and only swaps in the compiled functions, so the two can never
disagree on policy, only on bytes, which the tests compare.
"""

from __future__ import annotations

import contextlib
import enum
import errno as errno_mod
import logging
import math
import mmap
import os
import platform
import stat
import struct
import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Type, TypeVar

from vhostmd_py.errors import (
    ChecksumError,
    ContentTooLargeError,
    DiskBusyError,
    DiskFormatError,
    DiskIOError,
    DiskSizeError,
    StrPath,
)

log = logging.getLogger(__name__)

SIGNATURE = 0x6D766264  # b"mvbd"
HEADER_SIZE = 16
MIN_DISK_SIZE = 1024
MAX_DISK_SIZE = 256 * 1024 * 1024
# Upstream's guest reader reads in O_DIRECT blocks of this size and fails on
# a smaller disk (FACTS 3, small-1k.img); the daemon warns about that.
UPSTREAM_READ_BLOCK = 65536
# Alignment of O_DIRECT buffers, offsets and sizes: 4096 covers 512-byte and
# 4K-native devices alike.
ALIGN = 4096

_U32_MAX = 0xFFFFFFFF
_HEADER = struct.Struct(">IIII")  # the layout in csrc/mdisk.c
_ZERO_CHUNK = bytes(65536)
# Bytes that count negative in the signed-char checksum.
_HIGH_BYTES = bytes(range(0x80, 0x100))

Clock = Callable[[], float]
Sleep = Callable[[float], None]


class Status(enum.IntEnum):
    """Result codes of one disk operation; the same numbers as MDISK_* in csrc/mdisk.h."""

    OK = 0
    TOOLARGE = 1
    BUSY = 2
    SIGNATURE = 3
    LENGTH = 4
    CHANGED = 5
    CHECKSUM = 6
    SHORT = 7
    BUFFER = 8
    ARG = 9


@dataclass(frozen=True)
class Header:
    """The 16-byte disk header (layout in csrc/mdisk.c)."""

    signature: int
    busy: int
    checksum: int
    length: int

    def __post_init__(self) -> None:
        for name in ("signature", "busy", "checksum", "length"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= _U32_MAX:
                raise ValueError(f"header field {name} must be a uint32, got {value!r}")

    @property
    def has_signature(self) -> bool:
        """Whether this is an mvbd header (the guest's discovery test)."""
        return self.signature == SIGNATURE


# --- the pure-Python hot path ------------------------------------------------


def checksum(data: bytes) -> int:
    """Signed-char sum of data modulo 2**32 (csrc/mdisk.c explains why signed)."""
    high = len(data) - len(bytes(data).translate(None, _HIGH_BYTES))
    return (sum(data) - 256 * high) & _U32_MAX


def pack_header(h: Header) -> bytes:
    """The 16 header bytes of h."""
    return _HEADER.pack(h.signature, h.busy, h.checksum, h.length)


def unpack_header(raw: bytes) -> Header:
    """The Header in the first 16 bytes of raw."""
    if len(raw) < HEADER_SIZE:
        raise DiskFormatError("<memory>", f"need {HEADER_SIZE} header bytes, got {len(raw)}")
    return Header(*_HEADER.unpack_from(raw, 0))


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


def _publish_py(fd: int, content: bytes, disk_size: int, clear_to: int) -> int:
    """The publish sequence of csrc/mdisk.c (mdisk_publish) in Python; a Status or -errno."""
    length = len(content)
    if disk_size < HEADER_SIZE or length > disk_size - HEADER_SIZE or length > _U32_MAX:
        return Status.TOOLARGE
    end = HEADER_SIZE + length
    clear_to = min(clear_to, disk_size)
    total = checksum(content)
    try:
        _pwrite_all(fd, _HEADER.pack(SIGNATURE, 1, total, length), 0)
        _pwrite_all(fd, content, HEADER_SIZE)
        if clear_to > end:
            _pwrite_zeros(fd, end, clear_to)
        _pwrite_all(fd, _HEADER.pack(SIGNATURE, 0, total, length), 0)
    except OSError as err:
        # As in C: never leave busy set if we can help it (SPEC 4).
        _set_busy_py(fd, 0)
        return -(err.errno or errno_mod.EIO)
    return Status.OK


def _set_busy_py(fd: int, busy: int) -> int:
    try:
        _pwrite_all(fd, struct.pack(">I", busy), 4)
    except OSError as err:
        return -(err.errno or errno_mod.EIO)
    return Status.OK


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _pread_upto(fd: int, buf: mmap.mmap, want: int) -> int:
    """Read up to want bytes at offset 0 into buf (mdisk.c's pread_upto)."""
    view = memoryview(buf)
    got = 0
    try:
        while got < want:
            n = os.preadv(fd, [view[got:want]], got)
            if n == 0:
                break
            got += n
            if got % ALIGN:
                break  # short unaligned O_DIRECT read: end of file
    finally:
        view.release()
    return got


def _drop_cache(fd: int, direct: bool) -> None:
    if not direct:
        # Without O_DIRECT a guest would keep re-reading its stale page cache.
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


AttemptResult = Tuple[int, Optional[Header], Optional[bytes]]


def _attempt_py(fd: int, direct: bool, dev_size: int, buf: mmap.mmap, want: int) -> AttemptResult:
    """One stable-read attempt, as mdisk_read_stable in csrc/mdisk.c."""
    try:
        _drop_cache(fd, direct)
        n = _pread_upto(fd, buf, want)
        if n < HEADER_SIZE:
            return Status.SHORT, None, None
        h = Header(*_HEADER.unpack_from(buf, 0))
        if h.signature != SIGNATURE:
            return Status.SIGNATURE, h, None
        if h.busy:
            return Status.BUSY, h, None
        need = HEADER_SIZE + h.length
        if need > dev_size or need > MAX_DISK_SIZE:
            return Status.LENGTH, h, None
        if need > want:
            return Status.BUFFER, h, None
        if need > n:
            return Status.CHANGED, h, None
        first = buf[:HEADER_SIZE]
        with mmap.mmap(-1, ALIGN) as again:
            _drop_cache(fd, direct)
            m = _pread_upto(fd, again, ALIGN)
            second = again[:HEADER_SIZE]
        if m < HEADER_SIZE:
            return Status.CHANGED, h, None
        if _HEADER.unpack(second)[1]:
            return Status.BUSY, h, None
        if second != first:
            return Status.CHANGED, h, None
        content = buf[HEADER_SIZE:need]
        if checksum(content) != h.checksum:
            return Status.CHECKSUM, h, content
        return Status.OK, h, content
    except OSError as err:
        return -(err.errno or errno_mod.EIO), None, None


# --- OS plumbing shared with vhostmd_py.mdisk ---------------------------------


def _blkgetsize64() -> int:
    # _IOR(0x12, 114, size_t): the direction bits sit higher on these arches.
    if platform.machine().startswith(("ppc", "mips", "sparc")):
        return 0x40081272
    return 0x80081272


def device_size(fd: int, path: StrPath) -> int:
    """Size in bytes of an open regular file or block device; typed error otherwise."""
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        if stat.S_ISBLK(st.st_mode):
            import fcntl  # only block devices need it

            raw = fcntl.ioctl(fd, _blkgetsize64(), bytes(8))
            return int(struct.unpack("=Q", raw)[0])
    except OSError as err:
        raise DiskIOError(path, f"cannot get the disk size: {err.strerror}", err.errno) from err
    if stat.S_ISDIR(st.st_mode):
        raise DiskIOError(path, "is a directory, not a metrics disk", errno_mod.EISDIR)
    raise DiskIOError(path, "not a regular file or block device")


def open_for_read(path: StrPath, direct: bool = True) -> Tuple[int, bool]:
    """Open path read-only, O_DIRECT when allowed; returns (fd, opened_direct)."""
    # O_NONBLOCK: opening a FIFO (or a tray-less CD-ROM) must fail or return
    # at once rather than hang; it changes nothing for files and disks.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    if direct:
        try:
            return os.open(path, flags | os.O_DIRECT), True
        except OSError as err:
            # O_DIRECT is refused with EINVAL by file systems without it
            # (tmpfs before Linux 6.6); read through the cache then, dropping it.
            if err.errno != errno_mod.EINVAL:
                raise DiskIOError(path, f"cannot open: {err.strerror}", err.errno) from err
            log.debug("%s: O_DIRECT refused, reading through the page cache", os.fspath(path))
    try:
        return os.open(path, flags), False
    except OSError as err:
        raise DiskIOError(path, f"cannot open: {err.strerror}", err.errno) from err


def read_first_block(path: StrPath, direct: bool = True) -> bytes:
    """The first ALIGN bytes of path (fewer if it is shorter), read with O_DIRECT."""
    fd, opened_direct = open_for_read(path, direct)
    try:
        device_size(fd, path)  # refuses directories, sockets, FIFOs
        with mmap.mmap(-1, ALIGN) as buf:
            _drop_cache(fd, opened_direct)
            try:
                n = _pread_upto(fd, buf, ALIGN)
            except OSError as err:
                raise DiskIOError(path, f"cannot read: {err.strerror}", err.errno) from err
            return buf[:n]
    finally:
        os.close(fd)


def _header_from_block(path: StrPath, block: bytes, unpack: Callable[[bytes], Header]) -> Header:
    if len(block) < HEADER_SIZE:
        raise DiskFormatError(
            path, f"only {len(block)} bytes, shorter than the {HEADER_SIZE}-byte header"
        )
    return unpack(block[:HEADER_SIZE])


def read_header(path: StrPath, *, direct: bool = True) -> Header:
    """The header of the disk at path (any signature: discovery decides)."""
    return _header_from_block(path, read_first_block(path, direct), unpack_header)


def check_disk_size(path: StrPath, size: int) -> None:
    """Raise DiskSizeError unless 1024 <= size <= 256 MiB (upstream's range)."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise DiskSizeError(path, -1)
    if not MIN_DISK_SIZE <= size <= MAX_DISK_SIZE:
        raise DiskSizeError(path, size)


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

_D = TypeVar("_D", bound="MetricsDisk")


class MetricsDisk:
    """The host's metrics disk, open for publishing (pure-Python publish path)."""

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
    def create(cls: Type[_D], path: StrPath, size: int) -> _D:
        """Create or truncate the disk (SPEC 4): zeros to size, header busy=1."""
        first = cls._pack(Header(SIGNATURE, 1, 0, 0))
        return cls(path, size, create_disk_file(path, size, first))

    @staticmethod
    def _pack(h: Header) -> bytes:
        return pack_header(h)

    def _write(self, content: bytes, clear_to: int) -> int:
        return _publish_py(self._fd, content, self.size, clear_to)

    def _clear_busy(self, fd: int) -> int:
        return _set_busy_py(fd, 0)

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
        rc = self._write(content, HEADER_SIZE + self._prev_length)
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
        code = -int(rc) if rc < 0 else errno_mod.EIO
        err = OSError(code, os.strerror(code))
        raise DiskIOError(self.path, f"publishing failed: {err.strerror}", code) from err

    def close(self) -> None:
        """Close the disk, clearing busy if no publish ever completed."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            if self._busy:
                rc = self._clear_busy(fd)
                if rc != Status.OK:
                    log.error("%s: cannot clear the busy flag: %s", self.path, os.strerror(-rc))
        finally:
            os.close(fd)

    def __enter__(self: _D) -> _D:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten disk must not keep its fd nor leave busy set; but a
        # forked child's copy must never write to the parent's disk.
        if getattr(self, "_fd", -1) >= 0 and getattr(self, "_owner_pid", None) == os.getpid():
            self.close()


# --- the reader ------------------------------------------------------------------


class DiskReader:
    """Guest-side stable reader keeping the disk open and its buffer between reads."""

    def __init__(
        self,
        path: StrPath,
        *,
        busy_timeout: float = 10.0,
        retry_interval: float = 0.05,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        direct: bool = True,
        checksum_grace: float = 1.0,
    ) -> None:
        """Open path (O_DIRECT unless direct=False or refused)."""
        self.path = os.fspath(path)
        for what, seconds in (
            ("busy_timeout", busy_timeout),
            ("retry_interval", retry_interval),
            ("checksum_grace", checksum_grace),
        ):
            # A nan timeout compares false forever: a busy disk would hang us.
            if not (math.isfinite(seconds) and seconds >= 0):
                raise ValueError(f"{what} must be a finite number of seconds >= 0, not {seconds!r}")
        self.busy_timeout = busy_timeout
        self.checksum_grace = checksum_grace
        self.retry_interval = retry_interval
        self._clock = clock
        self._sleep = sleep
        self._fd, self._direct = open_for_read(self.path, direct)
        self._want = ALIGN  # bytes to read per attempt, learnt from the length field
        try:
            device_size(self._fd, self.path)
            self._alloc(ALIGN)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    @property
    def direct(self) -> bool:
        """Whether reads bypass the page cache with O_DIRECT."""
        return self._direct

    # Implementation hooks (the C binding overrides these three).
    def _alloc(self, size: int) -> None:
        self._buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs

    def _capacity(self) -> int:
        return len(self._buf)

    def _free(self) -> None:
        self._buf.close()

    def _attempt(self, dev_size: int) -> AttemptResult:
        return _attempt_py(self._fd, self._direct, dev_size, self._buf, self._want)

    def _checksum(self, content: bytes) -> int:
        return checksum(content)

    def _fall_back_to_cache(self) -> None:
        # O_DIRECT accepted at open but refused at read (EINVAL): reopen.
        fd, _ = open_for_read(self.path, direct=False)
        os.close(self._fd)
        self._fd, self._direct = fd, False

    def read(self) -> bytes:
        """The current document, read consistently (SPEC 6 stable read)."""
        if self._fd < 0:
            raise DiskIOError(self.path, "reader is closed", errno_mod.EBADF)
        start = self._clock()
        # A torn read shows up as a checksum mismatch whose header changes
        # on the next attempt; the same header failing for checksum_grace
        # seconds is a corrupt disk, reported without waiting busy_timeout
        # (upstream never verifies the checksum at all).
        bad_header: Header | None = None
        bad_since = start
        while True:
            dev_size = device_size(self._fd, self.path)
            status, header, content = self._attempt(dev_size)
            if status == Status.OK and header is not None and content is not None:
                self._want = max(ALIGN, _round_up(HEADER_SIZE + header.length))
                return content
            if status == Status.BUFFER and header is not None:
                self._want = _round_up(HEADER_SIZE + header.length)
                if self._want > self._capacity():
                    self._free()
                    self._alloc(self._want)
                continue  # not a failed attempt: read again at once
            if status == -errno_mod.EINVAL and self._direct:
                self._fall_back_to_cache()
                continue
            self._raise_unless_transient(status, header, dev_size)
            now = self._clock()
            waited = now - start
            if status == Status.CHECKSUM and header is not None and content is not None:
                if header != bad_header:
                    bad_header, bad_since = header, now
                elif now - bad_since >= self.checksum_grace:
                    raise ChecksumError(self.path, header.checksum, self._checksum(content))
            if waited >= self.busy_timeout:
                if status == Status.CHECKSUM and header is not None and content is not None:
                    raise ChecksumError(self.path, header.checksum, self._checksum(content))
                raise DiskBusyError(self.path, waited)
            self._sleep(self.retry_interval)

    def _raise_unless_transient(self, status: int, header: Header | None, dev_size: int) -> None:
        # Busy, a header that changed under us and a checksum mismatch (a
        # torn read looks like one) are retried; everything else is final.
        if status in (Status.BUSY, Status.CHANGED, Status.CHECKSUM):
            return
        if status < 0:
            err = OSError(-status, os.strerror(-status))
            raise DiskIOError(self.path, f"cannot read: {err.strerror}", -status) from err
        if status == Status.SHORT:
            raise DiskFormatError(
                self.path, f"only {dev_size} bytes, shorter than the {HEADER_SIZE}-byte header"
            )
        if status == Status.SIGNATURE and header is not None:
            raise DiskFormatError(
                self.path, f"signature {header.signature:#010x} is not mvbd ({SIGNATURE:#010x})"
            )
        if status == Status.LENGTH and header is not None:
            raise DiskFormatError(
                self.path,
                f"length field {header.length} goes beyond the disk's {dev_size} bytes",
            )
        raise DiskIOError(self.path, f"unexpected disk read status {status}")

    def close(self) -> None:
        """Close the disk and free the buffer."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._free()

    def __enter__(self) -> DiskReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def read_once(
        cls,
        path: StrPath,
        *,
        busy_timeout: float = 10.0,
        retry_interval: float = 0.05,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        direct: bool = True,
        checksum_grace: float = 1.0,
    ) -> bytes:
        """The content of the metrics disk at path, read stably (guest side)."""
        with cls(
            path,
            busy_timeout=busy_timeout,
            retry_interval=retry_interval,
            clock=clock,
            sleep=sleep,
            direct=direct,
            checksum_grace=checksum_grace,
        ) as reader:
            return reader.read()


# One definition for both implementations: vhostmd_py.mdisk binds the same
# classmethod to its C-backed DiskReader.
read_disk = DiskReader.read_once
