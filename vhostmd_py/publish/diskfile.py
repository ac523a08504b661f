"""The metrics disk's file: safe creation, locking, allocation, and its path watched each cycle.

Everything here is OS plumbing around the file descriptors that the C
binding (vhostmd_py.publish.mdisk) publishes into; nothing here knows the
document. The daemon runs as root and its disks live in world-writable
/dev/shm, so:

- paths are walked with openat, one O_NOFOLLOW component at a time
  (open_parent), and a symlink is followed only where the kernel's
  fs.protected_symlinks rule would (_may_follow);
- the disk itself is opened O_NOFOLLOW, mode 0644 whatever the umask;
- an exclusive flock(2) says which vhostmd owns a disk (lock_holder names
  the other one, from /proc/locks);
- its blocks are allocated (posix_fallocate) before the old content goes;
- a disk deleted or replaced under us is re-created at its path, and the
  old inode keeps receiving documents for the guests that have it open
  (DiskFile.revalidate).

Every OSError leaves as a DiskIOError naming the path (vhostmd_py.fs).
"""

from __future__ import annotations

import errno as errno_mod
import fcntl
import logging
import os
import stat
from typing import Callable, List

from vhostmd_wire.disk import HEADER_SIZE, check_disk_size, device_size

from vhostmd_py.errors import DiskIOError, StrPath
from vhostmd_py.fs import os_error, translated

__all__ = [
    "MAX_OLD_INODES",
    "DiskFile",
    "Inode",
    "allocate",
    "create_disk_file",
    "directory_stat",
    "lock_holder",
    "names_file",
    "open_parent",
    "path_identity",
    "unlink",
]

log = logging.getLogger(__name__)

_ZERO_CHUNK = bytes(65536)
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC

# How many replaced inodes of the disk we keep publishing into. A guest started
# before the file was deleted or replaced still reads the old inode through
# QEMU's open fd, and we cannot see whether QEMU still holds it; so we keep the
# most recent ones, oldest dropped first. Each costs one fd and the disk's size
# in memory (tmpfs) until dropped.
MAX_OLD_INODES = 4


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


# --- the path -------------------------------------------------------------------------


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


def _open_component(fd: int, comp: str, walked: str, spath: str, *, make: bool) -> int:
    """COMP opened under the directory FD (O_PATH), made first when missing and MAKE."""
    try:
        return os.open(comp, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
    except FileNotFoundError as err:
        parent = os.path.dirname(spath)
        if not make:
            raise os_error(DiskIOError, spath, f"cannot create directory {parent}", err) from err
        try:
            os.mkdir(comp, 0o755, dir_fd=fd)
        except FileExistsError:
            pass
        except OSError as mk_err:
            raise os_error(
                DiskIOError, spath, f"cannot create directory {parent}", mk_err
            ) from mk_err
        return os.open(comp, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
    except OSError as err:
        if err.errno not in (errno_mod.ELOOP, errno_mod.ENOTDIR):
            raise os_error(DiskIOError, spath, f"cannot open {walked}", err) from err
        link = os.stat(comp, dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISLNK(link.st_mode):
            raise DiskIOError(spath, f"{walked} is not a directory", errno_mod.ENOTDIR) from err
        if not _may_follow(link, os.fstat(fd)):
            raise DiskIOError(
                spath,
                f"refusing to follow the symbolic link {walked} (owner uid {link.st_uid}) "
                "in a sticky world-writable directory",
                errno_mod.ELOOP,
            ) from err
        return os.open(comp, _DIR_FLAGS, dir_fd=fd)


def open_parent(path: StrPath, *, create: bool) -> tuple[int, str]:
    """(an O_PATH fd of PATH's directory, PATH's last component), walking with openat.

    Each directory component is opened with O_NOFOLLOW relative to the one
    before, so the check on a symlink and the use of it cannot be told apart
    by a race. A symlink component is followed only where _may_follow allows
    (the kernel follows the link's own target path). With CREATE the last
    directory component is made when missing, as upstream does (only that
    one: docs/COMPATIBILITY.md). The caller closes the fd.
    """
    spath = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(spath)
    parts = [c for c in parent.split("/") if c]
    fd = os.open("/", _DIR_FLAGS)
    walked = ""
    try:
        for index, comp in enumerate(parts):
            walked += "/" + comp
            make = create and index == len(parts) - 1
            with translated(DiskIOError, spath, f"cannot open {walked}"):
                nfd = _open_component(fd, comp, walked, spath, make=make)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def directory_stat(directory: StrPath, *, create: bool) -> os.stat_result:
    """The stat of DIRECTORY reached by the openat walk (its last component made if CREATE)."""
    dirfd, _ = open_parent(os.path.join(os.fspath(directory), "x"), create=create)
    try:
        return os.fstat(dirfd)
    finally:
        os.close(dirfd)


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
        raise os_error(DiskIOError, path, "cannot stat", err) from err
    finally:
        os.close(dirfd)
    return st.st_dev, st.st_ino


def names_file(path: StrPath, fd: int) -> bool:
    """Whether PATH (walked as open_parent does) still names the file open as FD."""
    with translated(DiskIOError, path, "cannot stat"):
        st = os.fstat(fd)
    return path_identity(path) == (st.st_dev, st.st_ino)


def unlink(path: StrPath) -> None:
    """Remove PATH relative to its directory walked with openat: never through a planted link."""
    dirfd, name = open_parent(path, create=False)
    try:
        with translated(DiskIOError, path, "cannot remove"):
            os.unlink(name, dir_fd=dirfd)
    finally:
        os.close(dirfd)


# --- lock and room --------------------------------------------------------------------


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
        return None  # only the message loses the holder's pid
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
        raise os_error(DiskIOError, path, "cannot lock", err) from err


def allocate(fd: int, path: str, size: int) -> None:
    """posix_fallocate the disk's SIZE bytes, so that no publish ever needs new space.

    Upstream creates the file sparse: on a full filesystem a longer document
    then fails midway (ENOSPC) and the last good one is lost.
    """
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in (errno_mod.ENOSPC, errno_mod.EDQUOT):
            raise os_error(
                DiskIOError, path, f"no room for the {size}-byte metrics disk on its filesystem",
                err,
            ) from err
        if err.errno not in (errno_mod.EOPNOTSUPP, errno_mod.EINVAL):
            raise os_error(DiskIOError, path, "cannot allocate", err) from err
        # A filesystem without fallocate: keep the file as it is (sparse).


# --- creation -------------------------------------------------------------------------


def _open_disk(spath: str) -> int:
    dirfd, name = open_parent(spath, create=True)
    try:
        try:
            _refuse_special(spath, os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise os_error(DiskIOError, spath, "cannot stat", err) from err
        try:
            return os.open(
                name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dirfd
            )
        except OSError as err:
            if err.errno == errno_mod.ELOOP:
                raise DiskIOError(
                    spath, "is a symbolic link: refusing to follow it", err.errno
                ) from err
            raise os_error(DiskIOError, spath, "cannot create", err) from err
    finally:
        os.close(dirfd)


def create_disk_file(path: StrPath, size: int, first_header: bytes) -> int:
    """Create the disk: parent dir, lock, mode 0644, room, busy header, zeros; the fd.

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
    fd = _open_disk(spath)
    try:
        with translated(DiskIOError, spath, "cannot initialise"):
            st = os.fstat(fd)
            _refuse_special(spath, st.st_mode)  # it may have changed since the stat
            _lock(fd, spath)
            if stat.S_ISREG(st.st_mode):
                allocate(fd, spath, size)  # before the old content goes
                os.fchmod(fd, 0o644)  # whatever the umask or the old file's mode
                _pwrite_all(fd, first_header, 0)
                os.ftruncate(fd, HEADER_SIZE)  # the old content goes...
                os.ftruncate(fd, size)  # ...and this zero-fills to the size...
                allocate(fd, spath, size)  # ...sparse again: the blocks back
            else:
                have = device_size(fd, spath)
                if have < size:
                    raise DiskIOError(
                        spath, f"block device of {have} bytes is smaller than {size}"
                    )
                _pwrite_all(fd, first_header, 0)
                _pwrite_zeros(fd, HEADER_SIZE, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


# --- the open disk, its path checked every cycle -------------------------------------


class Inode:
    """One open inode of the disk: its fd, and how far the last document written reaches."""

    __slots__ = ("fd", "identity", "regular", "written")

    def __init__(self, fd: int) -> None:
        st = os.fstat(fd)
        self.fd = fd
        self.identity = (st.st_dev, st.st_ino)
        self.regular = stat.S_ISREG(st.st_mode)
        # Length of the document on it: creation zero-filled, nothing stale.
        self.written = 0


class DiskFile:
    """The disk's current inode at PATH, and the replaced ones still written to.

    Before every publish the path is checked (revalidate; upstream keeps
    writing whatever inode it opened at start-up): a disk deleted, replaced,
    or whose directory was removed is re-created at its path, said once; the
    old inode stays in ``old`` (at most MAX_OLD_INODES of them) for the
    guests that still have it open. A file truncated under us gets its size
    and its blocks back.
    """

    def __init__(self, path: StrPath, size: int, first_header: bytes) -> None:
        """Create the disk at PATH (create_disk_file); FIRST_HEADER also heads every re-creation."""
        self.path = os.fspath(path)
        self.size = size
        self._first = first_header
        self.current = Inode(create_disk_file(path, size, first_header))
        self.old: List[Inode] = []
        self._path_problem: str | None = None  # what was last said about the path

    def _say_once(self, problem: str | None, message: str, *args: object) -> None:
        if problem != self._path_problem:
            log.warning(message, *args)
        self._path_problem = problem

    def revalidate(self) -> None:
        """Make the path name our disk again and give it its size back (each cycle)."""
        try:
            now = path_identity(self.path)
        except DiskIOError as err:
            self._say_once(f"bad:{err}", "%s", err)
            return
        if now != self.current.identity:
            self._recreate("was deleted" if now is None else "was replaced by another file")
            return
        if self._path_problem is not None:
            log.info("Metrics disk %s is usable again", self.path)
            self._path_problem = None
        if self.current.regular:
            self._restore_size()

    def _recreate(self, what: str) -> None:
        try:
            fd = create_disk_file(self.path, self.size, self._first)
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
        self.old.append(self.current)
        while len(self.old) > MAX_OLD_INODES:
            os.close(self.old.pop(0).fd)
        self.current = Inode(fd)

    def _restore_size(self) -> None:
        inode = self.current
        try:
            with translated(DiskIOError, self.path, "cannot restore its size"):
                have = os.fstat(inode.fd).st_size
                if have == self.size:
                    return
                log.warning(
                    "Metrics disk %s is %d bytes instead of %d (truncated?): restoring its size",
                    self.path, have, self.size,
                )
                os.ftruncate(inode.fd, self.size)
            allocate(inode.fd, self.path, self.size)
        except DiskIOError as err:
            log.error("Metrics disk %s: cannot restore its size: %s", self.path, err)
            return
        if have < HEADER_SIZE + inode.written:
            inode.written = 0  # what was past `have` is zeros now

    def resize(self, size: int, cut: Callable[[Inode], None]) -> None:
        """Give the current inode SIZE bytes (a reload); DiskIOError, nothing changed, if no room.

        CUT is called before a shrink that cuts into the document on it."""
        check_disk_size(self.path, size)
        inode = self.current
        if not inode.regular:
            have = device_size(inode.fd, self.path)
            if have < size:
                raise DiskIOError(self.path, f"block device of {have} bytes is smaller than {size}")
        elif size > self.size:
            allocate(inode.fd, self.path, size)  # refused before anything changes
        else:
            with translated(DiskIOError, self.path, "cannot resize"):
                if HEADER_SIZE + inode.written > size:
                    cut(inode)
                os.ftruncate(inode.fd, size)
        self.size = size

    def close_old(self) -> None:
        """Close the replaced inodes."""
        old, self.old = self.old, []
        for inode in old:
            os.close(inode.fd)

    def close(self) -> None:
        """Close every inode (the current one last)."""
        self.close_old()
        os.close(self.current.fd)
