"""The metrics disk ("mvbd") format in pure Python: THE description of the binary layout.

Layout (big-endian, 16-byte header, then the document)::

    offset 0   uint32 signature  0x6d766264 ("mvbd")
    offset 4   uint32 busy       1 while the host writes, else 0
    offset 8   uint32 checksum   sum of the content bytes as SIGNED chars, mod 2**32
    offset 12  uint32 length     content bytes that follow the header
    offset 16  content           the metrics document (<metrics>...</metrics>\\n)

The checksum is signed because upstream sums ``char`` on x86 (FACTS.md section 1):
bytes 0x80..0xff count negative. The host's compiled hot path
(csrc/mdisk.c, vhostmd_py.publish._mdisk) packs the same layout; the tests use this
module as its oracle. Standard library only, Python 3.6+: the guest reads
disks with it.

Publishing (host) is: header with busy=1, the content, zeros over what the
previous (longer) document left, header with busy=0. Reading (guest) is the
stable read: retry while busy or while the header changes under us, verify
the checksum; the retry policy lives once, in DiskReader.read.
"""

import contextlib
import enum
import errno as errno_mod
import io
import logging
import math
import mmap
import os
import stat
import struct
import time
from typing import Any, Callable, NamedTuple, Optional, Tuple

from .errors import (
    ChecksumError,
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
# a smaller disk (FACTS.md section 3, small-1k.img); the daemon warns about that.
UPSTREAM_READ_BLOCK = 65536
# Alignment of O_DIRECT buffers, offsets and sizes: 4096 covers 512-byte and
# 4K-native devices alike.
ALIGN = 4096

DEFAULT_BUSY_TIMEOUT = 10.0
DEFAULT_RETRY_INTERVAL = 0.05
DEFAULT_CHECKSUM_GRACE = 1.0

_U32_MAX = 0xFFFFFFFF
_HEADER = struct.Struct(">IIII")
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


class _HeaderFields(NamedTuple):
    signature: int
    busy: int
    checksum: int
    length: int


class Header(_HeaderFields):
    """The 16-byte disk header (layout in this module's docstring); immutable."""

    __slots__ = ()

    def __new__(cls, signature: int, busy: int, checksum: int, length: int) -> "Header":
        for name, value in zip(_HeaderFields._fields, (signature, busy, checksum, length)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U32_MAX:
                raise ValueError(f"header field {name} must be a uint32, got {value!r}")
        return super().__new__(cls, signature, busy, checksum, length)

    @property
    def has_signature(self) -> bool:
        """Whether this is an mvbd header (the guest's discovery test)."""
        return self.signature == SIGNATURE


# --- the format as pure functions ---------------------------------------------


def checksum(data: Any) -> int:
    """Signed-char sum of data (bytes or any buffer) modulo 2**32."""
    raw = bytes(data)
    high = len(raw) - len(raw.translate(None, _HIGH_BYTES))
    return (sum(raw) - 256 * high) & _U32_MAX


def pack_header(h: Header) -> bytes:
    """The 16 header bytes of h."""
    return _HEADER.pack(h.signature, h.busy, h.checksum, h.length)


def unpack_header(raw: Any) -> Header:
    """The Header in the first 16 bytes of raw."""
    if len(raw) < HEADER_SIZE:
        raise DiskFormatError("<memory>", f"need {HEADER_SIZE} header bytes, got {len(raw)}")
    return Header(*_HEADER.unpack_from(raw, 0))


def check_disk_size(path: StrPath, size: int) -> None:
    """Raise DiskSizeError unless 1024 <= size <= 256 MiB (upstream's range)."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise DiskSizeError(path, -1)
    if not MIN_DISK_SIZE <= size <= MAX_DISK_SIZE:
        raise DiskSizeError(path, size)


def fits(length: int, disk_size: int) -> bool:
    """Whether a document of length bytes fits a disk of disk_size bytes."""
    return HEADER_SIZE + length <= disk_size and length <= _U32_MAX


def created_image(size: int) -> bytes:
    """The disk right after the host created it: header busy=1, length 0, zeros to size."""
    return pack_header(Header(SIGNATURE, 1, 0, 0)) + bytes(size - HEADER_SIZE)


def published_image(image: bytes, content: bytes, prev_length: int) -> bytes:
    """The disk bytes after publishing content over image (the test oracle of a publish).

    prev_length is the length of the previous document: bytes between the
    new end and the old end are zeroed, the rest of the disk stays as it was
    (a disk keeps whatever lies beyond the longest document ever written).
    """
    if not fits(len(content), len(image)):
        raise ValueError(f"{len(content)} content bytes do not fit a {len(image)}-byte disk")
    end = HEADER_SIZE + len(content)
    clear_to = min(max(end, HEADER_SIZE + prev_length), len(image))
    head = pack_header(Header(SIGNATURE, 0, checksum(content), len(content)))
    return head + content + bytes(clear_to - end) + image[clear_to:]


# --- reading: OS plumbing -------------------------------------------------------


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _read_into(fd: int, view: memoryview) -> int:
    """read(2) straight into view (an aligned slice of an mmap) at the file offset."""
    readv = getattr(os, "readv", None)  # CPython; PyPy lacks it
    if readv is not None:
        return int(readv(fd, [view]))
    # PyPy: FileIO.readinto. Should it bounce through an unaligned buffer,
    # O_DIRECT refuses with EINVAL and DiskReader reads through the cache.
    with io.FileIO(fd, "rb", closefd=False) as f:
        return f.readinto(view) or 0


def _pread_upto(fd: int, buf: mmap.mmap, want: int) -> int:
    """Read up to want bytes at offset 0 into buf (mdisk.c's pread_upto).

    lseek + readv rather than os.preadv, which is Python 3.7+; buf is an
    anonymous mmap, so page-aligned as O_DIRECT requires, and every read but
    the last ends on an ALIGN boundary.
    """
    view = memoryview(buf)
    got = 0
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        while got < want:
            n = _read_into(fd, view[got:want])  # EINTR is retried by Python (PEP 475)
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
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _blkgetsize64() -> int:
    # _IOR(0x12, 114, size_t): the direction bits sit higher on these arches.
    if os.uname().machine.startswith(("ppc", "mips", "sparc")):
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
    o_direct = getattr(os, "O_DIRECT", 0)
    if direct and o_direct:
        try:
            return os.open(path, flags | o_direct), True
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
        with contextlib.closing(mmap.mmap(-1, ALIGN)) as buf:
            _drop_cache(fd, opened_direct)
            try:
                n = _pread_upto(fd, buf, ALIGN)
            except OSError as err:
                if err.errno == errno_mod.EINVAL and opened_direct:
                    # O_DIRECT accepted at open, refused at read: read cached.
                    return read_first_block(path, direct=False)
                raise DiskIOError(path, f"cannot read: {err.strerror}", err.errno) from err
            return buf[:n]
    finally:
        os.close(fd)


def read_header(path: StrPath, direct: bool = True) -> Header:
    """The header of the disk at path (any signature: discovery decides)."""
    block = read_first_block(path, direct)
    if len(block) < HEADER_SIZE:
        raise DiskFormatError(
            path, f"only {len(block)} bytes, shorter than the {HEADER_SIZE}-byte header"
        )
    return unpack_header(block)


# --- reading: one attempt ---------------------------------------------------------

AttemptResult = Tuple[int, Optional[Header], Optional[bytes]]


class PyReadStrategy:
    """One stable-read attempt in pure Python (the reference of mdisk_read_stable in C).

    A read strategy owns the aligned buffer and makes single attempts; the
    retry policy is DiskReader's. The host's compiled strategy
    (vhostmd_py.publish.mdisk.CReadStrategy) has the same four methods.
    """

    def __init__(self) -> None:
        self._buf = mmap.mmap(-1, ALIGN)  # page-aligned, as O_DIRECT needs

    def alloc(self, size: int) -> None:
        """Replace the buffer by one of size bytes (a multiple of ALIGN)."""
        self._buf.close()
        self._buf = mmap.mmap(-1, size)

    def capacity(self) -> int:
        """The buffer's size in bytes."""
        return len(self._buf)

    def free(self) -> None:
        """Release the buffer."""
        self._buf.close()

    def attempt(self, fd: int, direct: bool, dev_size: int, want: int) -> AttemptResult:
        """(Status or -errno, header if one was read, content if OK or CHECKSUM)."""
        buf = self._buf
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
            # Re-read the header: a writer that started meanwhile set busy
            # or changed it, and the content read may be torn.
            with contextlib.closing(mmap.mmap(-1, ALIGN)) as again:
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


# --- reading: the stable reader and its retry policy ------------------------------


class DiskReader:
    """Guest-side stable reader keeping the disk open and its buffer between reads."""

    def __init__(
        self,
        path: StrPath,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        direct: bool = True,
        checksum_grace: float = DEFAULT_CHECKSUM_GRACE,
        strategy: Any = None,
    ) -> None:
        """Open path (O_DIRECT unless direct=False or refused); strategy: PyReadStrategy()."""
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
            self._strategy = strategy if strategy is not None else PyReadStrategy()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    @property
    def direct(self) -> bool:
        """Whether reads bypass the page cache with O_DIRECT."""
        return self._direct

    def _fall_back_to_cache(self) -> None:
        # O_DIRECT accepted at open but refused at read (EINVAL): reopen.
        fd, _ = open_for_read(self.path, direct=False)
        os.close(self._fd)
        self._fd, self._direct = fd, False

    def read(self) -> bytes:
        """The current document, read consistently (the stable read)."""
        if self._fd < 0:
            raise DiskIOError(self.path, "reader is closed", errno_mod.EBADF)
        strategy = self._strategy
        start = self._clock()
        # A torn read shows up as a checksum mismatch whose header changes
        # on the next attempt; the same header failing for checksum_grace
        # seconds is a corrupt disk, reported without waiting busy_timeout
        # (upstream never verifies the checksum at all).
        bad_header: Optional[Header] = None
        bad_since = start
        while True:
            dev_size = device_size(self._fd, self.path)
            status, header, content = strategy.attempt(self._fd, self._direct, dev_size, self._want)
            if status == Status.OK and header is not None and content is not None:
                self._want = max(ALIGN, _round_up(HEADER_SIZE + header.length))
                return content
            if status == Status.BUFFER and header is not None:
                self._want = _round_up(HEADER_SIZE + header.length)
                if self._want > strategy.capacity():
                    strategy.alloc(self._want)
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
                    raise ChecksumError(self.path, header.checksum, checksum(content))
            if waited >= self.busy_timeout:
                if status == Status.CHECKSUM and header is not None and content is not None:
                    raise ChecksumError(self.path, header.checksum, checksum(content))
                raise DiskBusyError(self.path, waited)
            self._sleep(self.retry_interval)

    def _raise_unless_transient(self, status: int, header: Optional[Header], dev_size: int) -> None:
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
            self._strategy.free()

    def __enter__(self) -> "DiskReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_disk(
    path: StrPath,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    retry_interval: float = DEFAULT_RETRY_INTERVAL,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    direct: bool = True,
    checksum_grace: float = DEFAULT_CHECKSUM_GRACE,
    strategy: Any = None,
) -> bytes:
    """The content of the metrics disk at path, read stably (guest side)."""
    with DiskReader(
        path,
        busy_timeout=busy_timeout,
        retry_interval=retry_interval,
        clock=clock,
        sleep=sleep,
        direct=direct,
        checksum_grace=checksum_grace,
        strategy=strategy,
    ) as reader:
        return reader.read()
