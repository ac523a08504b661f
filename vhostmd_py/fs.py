"""The filesystem boundary: atomic writes, directory fsync and creation, OSError translation.

Every module that touches files for state that must survive (alarms and
accounting state, the history index and RRD directories, the pid file, the
metrics disks, the virtio socket directory) goes through here, so an OSError
becomes a product error (vhostmd_py.errors) in one place, naming the path and
what was being done: ``<what failed>: <strerror>``.

A state file is replaced, never rewritten in place: the new content goes to a
temporary file in the same directory (same filesystem, so rename is atomic),
is fsync'ed, renamed over the old name, and the directory is fsync'ed so the
rename itself survives a power loss. A reader (vhostmdctl, or the daemon
after kill -9 or a reboot) therefore sees the old or the new content, never a
mix. JSON only: a state file is data, and unpickling a file that another user
may have written would execute code.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

from vhostmd_py.errors import StateFileError, StrPath, VhostmdError

# A product error made from (path, reason, errno): every path-carrying error
# class of vhostmd_py.errors takes these three.
ErrorKind = Callable[[str, str, "int | None"], VhostmdError]


def os_error(kind: ErrorKind, path: StrPath, doing: str, err: OSError) -> VhostmdError:
    """The product error of KIND for ERR, raised while DOING on PATH.

    Its reason is "DOING: strerror", or the bare strerror when DOING is ""
    (where the wording is upstream's, as the pid file's)."""
    why = err.strerror or str(err)
    return kind(os.fspath(path), f"{doing}: {why}" if doing else why, err.errno)


@contextlib.contextmanager
def translated(kind: ErrorKind, path: StrPath, doing: str) -> Iterator[None]:
    """Run the block; an OSError in it leaves as os_error(KIND, PATH, DOING, err)."""
    try:
        yield
    except OSError as err:
        raise os_error(kind, path, doing, err) from err


def fsync_dir(directory: StrPath) -> None:
    """fsync DIRECTORY itself, so a rename or a creation in it survives a power loss."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def make_dirs(directory: StrPath, kind: ErrorKind, *, mode: int = 0o755) -> None:
    """Create DIRECTORY and its missing parents with MODE (less the umask); KIND on failure."""
    with translated(kind, directory, "cannot create"):
        os.makedirs(directory, mode=mode, exist_ok=True)


def remove(path: StrPath, kind: ErrorKind, doing: str = "cannot remove") -> bool:
    """Remove the file PATH; False when it was not there, KIND on any other failure."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        raise os_error(kind, path, doing, err) from err
    return True


def write_atomic(
    path: StrPath, data: bytes, *, mode: int = 0o644, kind: ErrorKind = StateFileError,
    make_parent: bool = True,
) -> None:
    """Replace PATH with DATA: temp file, fsync, rename, fsync of the directory; KIND on failure.

    MAKE_PARENT: create the directory first when missing. The temporary file
    (hidden, unguessable name, same directory) never survives a failure.
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    with translated(kind, target, "cannot create a temporary file"):
        if make_parent:
            os.makedirs(directory, exist_ok=True)
        # tempfile is imported here: the daemon's RSS (bench/README.md, Cycle).
        import tempfile

        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", dir=directory)
    with translated(kind, target, "cannot write"):
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fchmod(fh.fileno(), mode)
                os.fsync(fh.fileno())
            os.rename(tmp, target)
        except BaseException:
            # Never leave temporaries behind, whatever failed (ENOSPC, a signal).
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(directory)


def write_json_atomic(path: StrPath, data: Any, *, mode: int = 0o644) -> None:
    """Replace PATH with DATA as JSON (write_atomic); StateFileError on failure."""
    import json  # only where state files are kept (history, alarms, accounting)

    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    write_atomic(path, text.encode("utf-8"), mode=mode)


def read_bytes(path: StrPath, kind: ErrorKind, *, limit: int = -1) -> bytes | None:
    """The content of PATH (at most LIMIT bytes), or None when it does not exist; KIND when
    unreadable."""
    try:
        with open(path, "rb") as fh:
            return fh.read(limit)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise os_error(kind, path, "cannot read", err) from err


def read_small(path: StrPath, kind: ErrorKind, *, limit: int = 4096) -> bytes | None:
    """PATH's bytes (at most LIMIT), never through a symlink; None when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise os_error(kind, path, "cannot open", err) from err
    try:
        with translated(kind, path, "cannot read"):
            return os.read(fd, limit)
    finally:
        os.close(fd)


def create_once(path: StrPath, make: Callable[[], bytes], kind: ErrorKind, *,
                mode: int = 0o600) -> bytes:
    """PATH's content; when missing, MAKE's bytes written there atomically with MODE.

    Atomic and never overwriting: the bytes go to a private temporary file
    (MODE from its creation, so never readable by others) that is
    hard-linked to PATH; if someone created PATH meanwhile (a second daemon),
    link fails and theirs is used, so every reader sees one value, complete.
    """
    target = os.fspath(path)
    data = read_small(target, kind)
    if data is not None:
        return data
    directory = os.path.dirname(target)
    with translated(kind, target, f"cannot create directory {directory}"):
        os.makedirs(directory, mode=0o755, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(target)}.{os.getpid()}.tmp")
    with translated(kind, target, f"cannot create {tmp}"):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
    try:
        with translated(kind, target, "cannot write"):
            try:
                os.fchmod(fd, mode)  # whatever the umask
                os.write(fd, make())
                os.fsync(fd)
            finally:
                os.close(fd)
            # Created meanwhile (a second daemon): theirs wins, never overwritten.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, target)
                fsync_dir(directory or ".")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    data = read_small(target, kind)
    if data is None:
        raise kind(target, "vanished right after its creation", None)
    return data


def read_json(path: StrPath) -> Any:
    """The JSON content of PATH, or None when it does not exist; StateFileError when unusable."""
    target = os.fspath(path)
    raw = read_bytes(target, StateFileError)
    if raw is None:
        return None
    try:
        import json

        return json.loads(raw.decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError is one too
        raise StateFileError(target, f"not valid JSON: {err}") from err
