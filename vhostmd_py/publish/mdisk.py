"""The host's metrics disk: THE binding of the compiled vhostmd_py.publish._mdisk (csrc/mdisk.c).

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
import fcntl
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

from vhostmd_py.publish._mdisk import ffi, lib

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
    if stat.S_ISLNK(mode):
        raise DiskIOError(path, "is a symbolic link: refusing to follow it", errno_mod.ELOOP)
    if stat.S_ISDIR(mode):
        raise DiskIOError(path, "is a directory, not a metrics disk", errno_mod.EISDIR)
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise DiskIOError(path, "exists and is not a regular file or block device")


_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


def _may_follow(link: os.stat_result, directory: os.stat_result) -> bool:
    """The kernel's fs.protected_symlinks rule for a symlink LINK found in DIRECTORY.

    In a sticky world-writable directory (/dev/shm, /tmp) a symlink is
    followed only when it belongs to us or to the directory's owner: anyone
    can plant one there, and the daemon runs as root. Elsewhere it is
    followed, as upstream follows every link of the path.
    """
    sticky_public = bool(directory.st_mode & stat.S_ISVTX) and bool(
        directory.st_mode & stat.S_IWOTH
    )
    return not sticky_public or link.st_uid in (os.geteuid(), directory.st_uid)


def open_parent(path: StrPath, *, create: bool) -> tuple[int, str]:
    """(an O_PATH fd of PATH's directory, PATH's last component), walking with openat.

    Each directory component is opened with O_NOFOLLOW relative to the one
    before, so the check on a symlink and the use of it cannot be told apart
    by a race. A symlink component is followed only where _may_follow allows
    (the kernel follows the link's own target path). With CREATE the last
    directory component is made when missing, as upstream does (FACTS 5
    disk-dir-missing: only that one).
    """
    spath = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(spath)
    parts = [c for c in parent.split("/") if c]
    fd = os.open("/", _DIR_FLAGS)
    walked = ""
    try:
        for index, comp in enumerate(parts):
            walked += "/" + comp
            try:
                nfd = os.open(comp, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError as err:
                if not (create and index == len(parts) - 1):
                    raise DiskIOError(
                        spath, f"cannot create directory {parent}: {err.strerror}", err.errno
                    ) from err
                try:
                    os.mkdir(comp, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                except OSError as mk_err:
                    raise DiskIOError(
                        spath, f"cannot create directory {parent}: {mk_err.strerror}",
                        mk_err.errno,
                    ) from mk_err
                nfd = os.open(comp, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as err:
                if err.errno not in (errno_mod.ELOOP, errno_mod.ENOTDIR):
                    raise DiskIOError(
                        spath, f"cannot open {walked}: {err.strerror}", err.errno
                    ) from err
                link = os.stat(comp, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(link.st_mode):
                    raise DiskIOError(
                        spath, f"{walked} is not a directory", errno_mod.ENOTDIR
                    ) from err
                if not _may_follow(link, os.fstat(fd)):
                    raise DiskIOError(
                        spath,
                        f"refusing to follow the symbolic link {walked} (owner uid {link.st_uid}) "
                        "in a sticky world-writable directory",
                        errno_mod.ELOOP,
                    ) from err
                nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except OSError as err:
        os.close(fd)
        raise DiskIOError(spath, f"cannot open {walked}: {err.strerror}", err.errno) from err
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def path_identity(path: StrPath) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what PATH names now (walked as open_parent does), None if nothing."""
    try:
        dirfd, name = open_parent(path, create=False)
    except DiskIOError as err:
        if err.errno in (errno_mod.ENOENT, errno_mod.ENOTDIR):
            return None
        raise
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DiskIOError(os.fspath(path), f"cannot stat: {err.strerror}", err.errno) from err
    finally:
        os.close(dirfd)
    return st.st_dev, st.st_ino


def lock_holder(st: os.stat_result, locks: StrPath = "/proc/locks") -> int | None:
    """The pid holding a flock(2) on the file of ST, from LOCKS (Linux's /proc/locks)."""
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open(locks, encoding="ascii", errors="replace") as fh:
            for line in fh:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 00:19:5678 0 EOF"; waiters have "->".
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == want:
                    return int(fields[4]) if fields[4].isdigit() else None
    except OSError:
        return None
    return None


def _lock(fd: int, path: str) -> None:
    """Take the daemon's exclusive lock on the disk file, or say who holds it.

    flock(2), not fcntl: QEMU locks bytes of the image with OFD fcntl locks
    (its image locking), and on Linux flock and fcntl locks never conflict,
    so guests can open the disk while we hold it; two vhostmd on one disk do
    conflict (upstream lets them alternate the disk's contents silently).
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        holder = lock_holder(os.fstat(fd))
        who = f"pid {holder}" if holder is not None else "another process"
        raise DiskIOError(
            path, f"in use by another vhostmd ({who}): refusing to publish into it", err.errno
        ) from err
    except OSError as err:
        raise DiskIOError(path, f"cannot lock: {err.strerror}", err.errno) from err


def _allocate(fd: int, path: str, size: int) -> None:
    """posix_fallocate the disk's SIZE bytes, so that no publish ever needs new space.

    Upstream creates the file sparse: on a full filesystem a longer document
    then fails midway (ENOSPC) and the last good one is lost.
    """
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in (errno_mod.ENOSPC, errno_mod.EDQUOT):
            raise DiskIOError(
                path, f"no room for the {size}-byte metrics disk on its filesystem: "
                f"{err.strerror}", err.errno,
            ) from err
        if err.errno not in (errno_mod.EOPNOTSUPP, errno_mod.EINVAL):
            raise
        # A filesystem without fallocate: keep the file as it is (sparse).


def create_disk_file(path: StrPath, size: int, first_header: bytes) -> int:
    """SPEC 4 creation: parent dir, lock, mode 0644, room, busy header, zeros; the fd.

    The busy header is written BEFORE the old content is dropped (not O_TRUNC
    first, as upstream does), so a guest reading while the daemon restarts
    sees "busy" and waits instead of failing on an empty or zeroed disk.
    O_NOFOLLOW and the openat walk (open_parent): the daemon runs as root in
    world-writable /dev/shm, where a planted symlink must not make it
    truncate another file. Nothing is written before the lock is ours: a
    second daemon must not touch the first one's disk. The blocks are
    allocated before anything is dropped, so no room means a clear start-up
    error with the old content intact.
    """
    check_disk_size(path, size)
    spath = os.fspath(path)
    dirfd, name = open_parent(spath, create=True)
    try:
        try:
            _refuse_special(spath, os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise DiskIOError(spath, f"cannot stat: {err.strerror}", err.errno) from err
        try:
            fd = os.open(
                name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dirfd
            )
        except OSError as err:
            if err.errno == errno_mod.ELOOP:
                raise DiskIOError(
                    spath, "is a symbolic link: refusing to follow it", err.errno
                ) from err
            raise DiskIOError(spath, f"cannot create: {err.strerror}", err.errno) from err
    finally:
        os.close(dirfd)
    try:
        st = os.fstat(fd)
        _refuse_special(spath, st.st_mode)  # it may have changed since the stat
        _lock(fd, spath)
        if stat.S_ISREG(st.st_mode):
            _allocate(fd, spath, size)  # before the old content goes
            os.fchmod(fd, 0o644)  # whatever the umask or the old file's mode
            _pwrite_all(fd, first_header, 0)
            os.ftruncate(fd, HEADER_SIZE)  # the old content goes...
            os.ftruncate(fd, size)  # ...and this zero-fills to the size...
            _allocate(fd, spath, size)  # ...sparse again: the blocks back
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


# How many replaced inodes of the disk we keep publishing into. A guest started
# before the file was deleted or replaced still reads the old inode through
# QEMU's open fd, and we cannot see whether QEMU still holds it; so we keep the
# most recent ones, oldest dropped first. Each costs one fd and the disk's size
# in memory (tmpfs) until dropped.
MAX_OLD_INODES = 4


class MetricsDisk:
    """The host's metrics disk, open for publishing (C publish path).

    Before every publish the path is checked (DEVIATION, issue 11 item 5;
    upstream keeps writing whatever inode it opened at start-up): a disk
    deleted, replaced, or whose directory was removed is re-created at its
    path, said once; the old inode keeps receiving every document (at most
    MAX_OLD_INODES of them) for the guests that still have it open. A file
    truncated under us gets its size and its blocks back.
    """

    def __init__(self, path: StrPath, size: int, fd: int) -> None:
        """Wrap an fd prepared by create(); use create() instead."""
        self.path = os.fspath(path)
        self.size = size
        self._fd = fd
        # create() zero-filled the disk, so nothing stale lies beyond 16+0.
        self._prev_length = 0
        self._busy = True  # create() leaves busy=1 until the first publish
        self._owner_pid = os.getpid()
        st = os.fstat(fd)
        self._identity = (st.st_dev, st.st_ino)
        self._regular = stat.S_ISREG(st.st_mode)
        self._old: list[tuple[int, int]] = []  # (fd, previous length) of replaced inodes
        self._path_problem: str | None = None  # what was last said about the path

    @classmethod
    def create(cls, path: StrPath, size: int) -> MetricsDisk:
        """Create or truncate the disk (SPEC 4): zeros to size, header busy=1."""
        first = pack_header(Header(SIGNATURE, 1, 0, 0))
        return cls(path, size, create_disk_file(path, size, first))

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._fd < 0

    @property
    def old_inodes(self) -> int:
        """How many replaced inodes still receive the documents."""
        return len(self._old)

    def fileno(self) -> int:
        """The open file descriptor (the daemon keeps it across a privilege drop)."""
        self._check_open()
        return self._fd

    def _check_open(self) -> None:
        if self._fd < 0:
            raise DiskIOError(self.path, "metrics disk is closed", errno_mod.EBADF)

    # --- the path and the size, checked every cycle ---------------------------------

    def _say_once(self, problem: str | None, message: str, *args: object) -> None:
        if problem != self._path_problem:
            log.warning(message, *args)
        self._path_problem = problem

    def revalidate(self) -> None:
        """Make the path name our disk again and give it its size back (each cycle)."""
        self._check_open()
        try:
            now = path_identity(self.path)
        except DiskIOError as err:
            self._say_once(f"bad:{err}", "%s", err)
            return
        if now != self._identity:
            what = "was deleted" if now is None else "was replaced by another file"
            try:
                fd = create_disk_file(self.path, self.size, pack_header(Header(SIGNATURE, 1, 0, 0)))
            except DiskIOError as err:
                self._say_once(
                    f"gone:{err}",
                    "Metrics disk %s %s and cannot be re-created (%s); "
                    "guests that have it open keep receiving metrics",
                    self.path, what, err,
                )
                return
            log.warning(
                "Metrics disk %s %s: re-created for guests started from now on; "
                "the old file keeps receiving metrics for the guests that have it open",
                self.path, what,
            )
            self._path_problem = None
            self._old.append((self._fd, self._prev_length))
            while len(self._old) > MAX_OLD_INODES:
                old_fd, _ = self._old.pop(0)
                os.close(old_fd)
            st = os.fstat(fd)
            self._fd, self._identity, self._prev_length = fd, (st.st_dev, st.st_ino), 0
            self._regular = stat.S_ISREG(st.st_mode)
            return
        if self._path_problem is not None:
            log.info("Metrics disk %s is usable again", self.path)
            self._path_problem = None
        if self._regular:
            self._restore_size()

    def _restore_size(self) -> None:
        try:
            have = os.fstat(self._fd).st_size
            if have == self.size:
                return
            log.warning(
                "Metrics disk %s is %d bytes instead of %d (truncated?): restoring its size",
                self.path, have, self.size,
            )
            os.ftruncate(self._fd, self.size)
            _allocate(self._fd, self.path, self.size)
        except (OSError, DiskIOError) as err:
            log.error("Metrics disk %s: cannot restore its size: %s", self.path, err)
            return
        if have < HEADER_SIZE + self._prev_length:
            self._prev_length = 0  # what was past `have` is zeros now

    def resize(self, size: int) -> None:
        """Give the open disk SIZE bytes (a reload); DiskIOError, nothing changed, if no room."""
        self._check_open()
        check_disk_size(self.path, size)
        if not self._regular:
            have = device_size(self._fd, self.path)
            if have < size:
                raise DiskIOError(self.path, f"block device of {have} bytes is smaller than {size}")
        elif size > self.size:
            _allocate(self._fd, self.path, size)  # refused before anything changes
        else:
            try:
                if HEADER_SIZE + self._prev_length > size:
                    # The document no longer fits: busy until the next publish.
                    lib.mdisk_set_busy(self._fd, 1)
                    self._busy = True
                    self._prev_length = 0
                os.ftruncate(self._fd, size)
            except OSError as err:
                raise DiskIOError(self.path, f"cannot resize: {err.strerror}", err.errno) from err
        self.size = size

    # --- publishing -------------------------------------------------------------------

    def publish(self, content: bytes) -> None:
        """Write content as the new document; too large -> error, old one stays."""
        self._check_open()
        self.revalidate()
        length = len(content)
        if HEADER_SIZE + length > self.size:
            raise ContentTooLargeError(self.path, length, self.size - HEADER_SIZE)
        kept = []
        for old_fd, old_length in self._old:
            rc = int(lib.mdisk_publish(old_fd, _cbytes(content), length, self.size,
                                       HEADER_SIZE + old_length))
            kept.append((old_fd, length if rc == Status.OK else max(old_length, length)))
        self._old = kept
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
        old, self._old = self._old, []
        for old_fd, _ in old:
            os.close(old_fd)
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
