"""THE binding of the compiled ``vhostmd_py.process._process`` (csrc/process.c).

One process-wide setting of the C allocator, made before the daemon starts
its threads: why is in csrc/process.c, the figures in bench/README.md
("Footprint beside upstream").
"""

from __future__ import annotations

import os
from typing import Mapping

ARENA_ENV = "MALLOC_ARENA_MAX"


def malloc_arena_max(n: int) -> None:
    """mallopt(M_ARENA_MAX, N); OSError (ENOSYS without glibc's setting, EINVAL if refused)."""
    from vhostmd_py.process._process import lib

    rc = int(lib.vh_malloc_arena_max(n))
    if rc != 0:
        raise OSError(-rc, os.strerror(-rc))


def one_malloc_arena(environ: Mapping[str, str]) -> bool:
    """Share one C allocator arena between the daemon's threads, unless ENVIRON's
    MALLOC_ARENA_MAX already chose (glibc read it at start); whether the limit was set."""
    if ARENA_ENV in environ:
        return False
    try:
        malloc_arena_max(1)
    except OSError:
        return False  # another C library: its own allocator, nothing to tune
    return True
