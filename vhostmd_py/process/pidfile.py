"""The daemon's exclusive pid file.

Upstream (vhostmd.c write_pid_file) opens the file O_CREAT|O_EXCL and refuses
to start when it exists: "Failed to open pid file 'P' : File exists", exit 1
(golden daemon-cli/pidfile-exists). We keep that, with one documented
DEVIATION: a *stale* file, one holding the decimal pid of a process that no
longer exists, is taken over (with a warning), because after a crash or a
power loss upstream needs a human to delete it before the host publishes
metrics again. An empty or unparsable file, or one naming a live process, is
still refused exactly as upstream does: we cannot tell it is stale.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Callable

from vhostmd_py.errors import PidFileError, StrPath
from vhostmd_py.fs import read_bytes, remove, translated

log = logging.getLogger(__name__)

PID_FILE_MODE = 0o644


def _pid_alive(pid: int) -> bool:
    """Whether a process with that pid exists (EPERM means it exists, not ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: str) -> int | None:
    """The pid written in an existing pid file, or None when unreadable or not a pid."""
    try:
        raw = read_bytes(path, PidFileError, limit=64)
    except PidFileError:
        return None
    if raw is None:
        return None
    text = raw.decode("ascii", "replace").strip()
    if not text.isdigit():
        return None
    pid = int(text)
    return pid if pid > 0 else None


class PidFile:
    """An exclusively created pid file, removed by `remove()` if it is still ours."""

    def __init__(self, path: str, pid: int) -> None:
        self.path = path
        self.pid = pid

    @classmethod
    def create(
        cls,
        path: StrPath,
        *,
        pid: int | None = None,
        alive: Callable[[int], bool] = _pid_alive,
    ) -> PidFile:
        """Create PATH exclusively with PID (default: ours); PidFileError when taken."""
        spath = os.fspath(path)
        own = os.getpid() if pid is None else pid
        # Upstream's wording: the bare strerror after "Failed to open pid file".
        with translated(PidFileError, spath, ""):
            try:
                fd = cls._open_exclusive(spath)
            except FileExistsError as err:
                stale = _read_pid(spath)
                if stale is not None and stale != own and alive(stale):
                    # Upstream's wording, plus who holds it.
                    raise PidFileError(
                        spath, f"{os.strerror(errno.EEXIST)} (vhostmd pid {stale} is running)"
                    ) from err
                if stale is None or stale == own:
                    raise PidFileError(spath, os.strerror(errno.EEXIST)) from err
                log.warning(
                    "Removing stale pid file '%s' of process %d, which is gone", spath, stale
                )
                # Failing here: another daemon won the race for the stale file, it is theirs.
                os.unlink(spath)
                fd = cls._open_exclusive(spath)
            try:
                os.write(fd, f"{own}\n".encode("ascii"))
            except BaseException:
                os.close(fd)
                os.unlink(spath)
                raise
            os.close(fd)
        return cls(spath, own)

    @staticmethod
    def _open_exclusive(path: str) -> int:
        """open(2) with O_EXCL, mode 0644 whatever the umask (upstream's mode)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PID_FILE_MODE)
        os.fchmod(fd, PID_FILE_MODE)
        return fd

    def remove(self) -> None:
        """Delete the file, only when it still holds our pid (never another daemon's)."""
        if _read_pid(self.path) != self.pid:
            log.warning("Pid file '%s' no longer holds pid %d: left in place", self.path, self.pid)
            return
        try:
            remove(self.path, PidFileError, "")
        except PidFileError as err:
            # Typical after -u USER: /run is not writable by the unprivileged user.
            log.warning("Unable to remove pid file '%s': %s", self.path, err.reason)
