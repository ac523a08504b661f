"""Atomic JSON state files (alarms history, accounting).

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
import json
import logging
import os
import tempfile
from typing import Any

from vhostmd_py.errors import StateFileError, StrPath

log = logging.getLogger(__name__)


def write_json_atomic(path: StrPath, data: Any, *, mode: int = 0o644) -> None:
    """Replace PATH with DATA as JSON: temp file, fsync, rename, fsync of the directory."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", dir=directory)
    except OSError as err:
        raise StateFileError(target, f"cannot create a temporary file: {err.strerror}") from err
    try:
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fchmod(fh.fileno(), mode)
                os.fsync(fh.fileno())
            os.rename(tmp, target)
        except BaseException:
            # Never leave temporaries behind, whatever failed (ENOSPC, a signal).
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as err:
        raise StateFileError(target, f"cannot write: {err.strerror or err}") from err


def read_json(path: StrPath) -> Any:
    """The JSON content of PATH, or None when it does not exist; StateFileError when unusable."""
    target = os.fspath(path)
    try:
        with open(target, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StateFileError(target, f"cannot read: {err.strerror or err}") from err
    except ValueError as err:
        raise StateFileError(target, f"not valid JSON: {err}") from err
