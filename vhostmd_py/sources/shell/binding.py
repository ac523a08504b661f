"""THE binding of the compiled ``vhostmd_py.sources.shell._runner`` (csrc/runner.c).

Only what crosses into C: the C buffers of one batch (commands, environments,
output buffers, results), the call of ``vh_run_batch`` (bytes in, results
out, -errno as OSError), the shared concurrency counter, the abort message
and the subreaper switch. What the results mean and when batches run is
vhostmd_py.sources.shell.runner; the behaviour of the C side is described
in csrc/runner.c.
"""

from __future__ import annotations

import os
import struct
from typing import Any, List, Mapping, Sequence, Tuple

from vhostmd_py.sources.shell._runner import ffi, lib

# struct vh_result flags (csrc/runner.h).
REAPED: int = lib.VH_REAPED
TIMEOUT: int = lib.VH_TIMEOUT
OVERFLOW: int = lib.VH_OVERFLOW
ABORTED: int = lib.VH_ABORTED
SPAWN_ERROR: int = lib.VH_SPAWN_ERROR
UNREAPED: int = lib.VH_UNREAPED
STARTED: int = lib.VH_STARTED
LINGERED: int = lib.VH_LINGERED

_ABORT_ALL = struct.pack("=I", lib.VH_ABORT_ALL)
# Output buffers are written by C before they are read: no need to zero the
# (mostly untouched) stderr_cap bytes per action.
_new_uncleared = ffi.new_allocator(should_clear_after_alloc=False)


def _raise_errno(rc: int) -> None:
    if rc != 0:
        raise OSError(-rc, os.strerror(-rc))


def set_child_subreaper(on: bool) -> None:
    """prctl(PR_SET_CHILD_SUBREAPER, ON): what our descendants orphan becomes ours; OSError."""
    _raise_errno(int(lib.vh_set_child_subreaper(1 if on else 0)))


def abort_message(index: int | None) -> bytes:
    """What to write to a batch's abort pipe to kill job INDEX (None: every job)."""
    return _ABORT_ALL if index is None else struct.pack("=I", index)


class Environment:
    """A NULL-terminated ``char *envp[]`` of ENV, kept alive as long as this object."""

    __slots__ = ("_keep", "envp")

    def __init__(self, env: Mapping[str, str]) -> None:
        self._keep = [ffi.new("char[]", os.fsencode(f"{k}={v}")) for k, v in env.items()]
        self.envp = ffi.new("char *[]", [*self._keep, ffi.NULL])


class Shared:
    """struct vh_shared: the slots left and the actions running, across concurrent batches."""

    __slots__ = ("c",)

    def __init__(self, slots: int) -> None:
        self.c = ffi.new("struct vh_shared *")
        self.c.slots = slots

    @property
    def running(self) -> int:
        """Actions running now (updated atomically by C)."""
        return int(self.c.running)


# What one job did, from its struct vh_result: flags, wait status, errno of a
# spawn error, stdout kept, stdout bytes seen, stderr kept, start and end (ns).
Raw = Tuple[int, int, int, bytes, int, bytes, int, int]


class Batch:
    """The C side of one vh_run_batch() call: its jobs, output buffers and results.

    JOBS: (command, stdout cap, environment) each; ERRCAP: stderr bytes kept
    per job. While run() goes on in another thread, ended(), pid() and
    flags() may be read: C stores a job's end_ns last and atomically.
    """

    __slots__ = ("_cjobs", "_errs", "_keep", "_outs", "_results", "errcap", "n", "offsets")

    def __init__(self, jobs: Sequence[Tuple[bytes, int, Environment]], errcap: int) -> None:
        n = self.n = len(jobs)
        self.errcap = errcap
        self._cjobs = cjobs = ffi.new("struct vh_job[]", n)
        self._outs = outs = _new_uncleared("unsigned char[]", max(1, sum(j[1] for j in jobs)))
        self._errs = errs = _new_uncleared("unsigned char[]", max(1, n * errcap))
        self._results = ffi.new("struct vh_result[]", n)
        self._keep: List[Any] = [ffi.new("char[]", j[0]) for j in jobs]
        self.offsets: List[int] = []
        offset = 0
        for i, (_command, cap, env) in enumerate(jobs):
            self.offsets.append(offset)
            c = cjobs[i]
            c.command = self._keep[i]
            c.envp = env.envp
            c.out = outs + offset
            c.out_cap = cap
            offset += cap
            c.err = errs + i * errcap
            c.err_cap = errcap

    def run(
        self, shell: bytes, fifo_prefix: bytes, shared: Shared, abort_fd: int, *,
        timeout_ms: int, kill_grace_ms: int, max_output: int, max_running: int, linger_ms: int,
    ) -> None:
        """vh_run_batch (blocks, GIL released): every job gets a result; OSError if not set up."""
        limits = ffi.new("struct vh_limits *")
        limits.timeout_ms = timeout_ms
        limits.kill_grace_ms = kill_grace_ms
        limits.max_output = max_output
        limits.max_running = max_running
        limits.linger_ms = linger_ms
        _raise_errno(int(lib.vh_run_batch(
            shell, fifo_prefix, self._cjobs, self.n, shared.c, limits, abort_fd, self._results
        )))

    def ended(self, index: int) -> bool:
        """True once C is done with job INDEX (its child killed and reaped, or never run)."""
        return bool(self._results[index].end_ns)

    def pid(self, index: int) -> int:
        """The pid of job INDEX's worker shell (0: none yet)."""
        return int(self._results[index].pid)

    def flags(self, index: int) -> int:
        """The VH_* flags of job INDEX so far."""
        return int(self._results[index].flags)

    def started_pids(self) -> List[int]:
        """The worker pids of the jobs started so far."""
        results = self._results
        return [results[i].pid for i in range(self.n) if results[i].flags & STARTED]

    def raw(self, index: int) -> Raw:
        """What job INDEX did (valid once ended)."""
        r = self._results[index]
        errcap = self.errcap
        return (
            r.flags,
            r.status,
            r.error,
            ffi.buffer(self._outs + self.offsets[index], r.out_len)[:],
            r.out_total,
            ffi.buffer(self._errs + index * errcap, r.err_len)[:] if r.err_len else b"",
            r.start_ns,
            r.end_ns,
        )
