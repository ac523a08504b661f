"""vhostmd_py.process.memory: one C allocator arena for the daemon's threads (csrc/process.c)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict

import pytest
from helpers import REPO

from vhostmd_py.process import memory

# A thread's first malloc gets it an arena of its own (up to glibc's limit);
# malloc_stats() prints one "Arena N:" block per arena on stderr.
_ARENAS = """
import ctypes, sys, threading
from vhostmd_py.process import memory
print(memory.one_malloc_arena({env!r}), flush=True)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
kept = []
together = threading.Barrier(3)  # all alive at once: no arena is handed on
def allocate():
    together.wait()
    kept.append(libc.malloc(1 << 16))
    together.wait()
threads = [threading.Thread(target=allocate) for _ in range(3)]
for t in threads: t.start()
for t in threads: t.join()
libc.malloc_stats()
"""


def _arenas(env: Dict[str, str]) -> tuple[str, int]:
    proc = subprocess.run(
        [sys.executable, "-c", _ARENAS.format(env=env)], capture_output=True, text=True,
        cwd=REPO, check=False, env={k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip(), proc.stderr.count("Arena ")


def test_threads_share_one_arena() -> None:
    """With the limit, three allocating threads use the main arena only."""
    assert _arenas({}) == ("True", 1)


def test_the_check_can_fail_an_operator_choice_wins() -> None:
    """MALLOC_ARENA_MAX in the environment: nothing set, so each thread has its own arena."""
    said, arenas = _arenas({"MALLOC_ARENA_MAX": "8"})
    assert said == "False"
    assert arenas == 4


def test_a_refused_value_is_an_oserror() -> None:
    with pytest.raises(OSError):
        memory.malloc_arena_max(0)
