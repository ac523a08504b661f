"""One batch of actions: the jobs, their C buffers, fifo directory and abort pipe; results.

A batch is what one vh_run_batch() call (csrc/runner.c, through
vhostmd_py.sources.shell.binding) runs in a worker thread; the runner
(vhostmd_py.sources.shell.runner) decides what goes into which batch and
when, vhostmd_py.sources.shell.stopping ends batches early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import threading
import time
from typing import Callable, Dict, List, NamedTuple, Set, Tuple

from vhostmd_py.errors import ActionError
from vhostmd_py.sources.shell import binding

log = logging.getLogger(__name__)


def default_runtime_dir() -> str:
    """Where the action fifos' private directories go: /dev/shm (tmpfs, already
    needed for the disk), else $TMPDIR, else /tmp."""
    for candidate in ("/dev/shm", os.environ.get("TMPDIR", ""), "/tmp"):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    return "/tmp"


def _private_dir(parent: str, _swept: Set[str] = set()) -> str:  # noqa: B006 - see below
    """A new mode-0700 directory with an unguessable name in PARENT (which may be
    world-writable: nobody can have made it first). tempfile.mkdtemp() does the
    same but its import costs the daemon ~0.6 MB of RSS (bench/README.md, Cycle).

    The name carries our pid, `vhostmd-actions.PID.RANDOM`: the first time a
    process uses PARENT (_swept remembers it, for the process's life), it
    removes the directories a killed daemon left there (kill -9 runs no
    cleanup), only ours (owner = our euid, a real directory) and only those
    whose PID no longer exists.
    """
    if parent not in _swept:
        import stat  # here: this helper is the only code of the runner that needs it

        _swept.add(parent)
        me = os.geteuid()
        with contextlib.suppress(OSError):
            for name in os.listdir(parent):
                fields = name.split(".")
                if len(fields) != 3 or fields[0] != "vhostmd-actions" or not fields[1].isdigit():
                    continue
                path = os.path.join(parent, name)
                try:
                    st = os.lstat(path)
                    if not stat.S_ISDIR(st.st_mode) or st.st_uid != me:
                        continue
                    os.kill(int(fields[1]), 0)
                except ProcessLookupError:
                    _remove_dir(path)  # its daemon is gone
                except OSError:
                    continue  # alive (EPERM: someone else's), or vanished
    while True:
        path = os.path.join(parent, f"vhostmd-actions.{os.getpid()}.{os.urandom(8).hex()}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path


def _remove_dir(path: str) -> None:
    """Remove PATH and the fifos left in it (only a batch cut short leaves any)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(path):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(path, name))
        os.rmdir(path)



class ActionResult(NamedTuple):
    """What one action did.

    A NamedTuple, not a dataclass: a cycle holds one per action (3000 for
    three metrics on 1000 VMs), and a tuple is a third of an object with a
    __dict__ (bench/bench_footprint.py).
    """

    returncode: int | None  # exit status, -N when killed by signal N, None if not run
    stdout: bytes  # the first `cap` bytes
    stdout_size: int  # all bytes seen (read and discarded past the cap)
    stderr: bytes  # the first stderr_cap bytes
    duration: float
    timed_out: bool = False
    overflow: bool = False  # output exceeded max_output: killed
    cancelled: bool = False
    spawn_error: str | None = None
    # Exited, but left something holding its output open for `linger` s: the
    # output is what was read by then, that something was killed.
    lingered: bool = False

    @property
    def ok(self) -> bool:
        """True when the action ran to completion and exited 0."""
        return self.returncode == 0 and not (self.timed_out or self.overflow or self.cancelled)

    def failure(self) -> str | None:
        """Why the value cannot be used, or None when ok."""
        if self.spawn_error is not None:
            return f"cannot run the shell: {self.spawn_error}"
        if self.cancelled:
            return "cancelled (daemon stopping)"
        if self.timed_out:
            return f"timed out after {self.duration:.1f} s, killed"
        if self.overflow:
            return f"output exceeds the limit ({self.stdout_size} bytes read so far), killed"
        if self.returncode is None:
            return "did not finish"
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            return f"killed by {name}"
        if self.returncode != 0:
            return f"exit status {self.returncode}"
        return None


_INT_MAX = 2**31 - 1  # C int milliseconds: ~24 days


def not_run(reason: str) -> ActionResult:
    """The result of an action that could not be started."""
    return ActionResult(None, b"", 0, b"", 0.0, spawn_error=reason)


def _convert(batch: Batch, i: int) -> ActionResult:
    """Job I's ActionResult from the C result and buffers of BATCH (C is done with it)."""
    flags, status, error, out, out_total, err, start_ns, end_ns = batch.c.raw(i)
    if flags & binding.SPAWN_ERROR:
        return not_run(os.strerror(error))
    return ActionResult(
        returncode=os.waitstatus_to_exitcode(status) if flags & binding.REAPED else None,
        stdout=out,
        stdout_size=out_total,
        stderr=err,
        duration=(end_ns - start_ns) / 1e9,
        timed_out=bool(flags & binding.TIMEOUT),
        overflow=bool(flags & binding.OVERFLOW),
        cancelled=bool(flags & binding.ABORTED),
        lingered=bool(flags & binding.LINGERED),
    )


class ActionJob:
    """One submitted action: ``future`` gets its ActionResult (see submit_many)."""

    __slots__ = ("batch", "cap", "command", "future", "index", "path", "submitted")

    def __init__(self, command: bytes, cap: int, path: str, future: asyncio.Future[ActionResult]):
        self.command = command
        self.cap = cap
        self.path = path
        self.future = future
        self.batch: Batch | None = None
        self.index = 0
        self.submitted = time.monotonic()

    def done(self) -> bool:
        """True once the result is in ``future``."""
        return self.future.done()



class Batch:
    """The jobs of one vh_run_batch() call, its C buffers and its abort pipe.

    The pipe is per batch so that an index written for a job of an ended
    batch can never kill a job of the next one; writes and the close are
    under one lock because they come from the loop and the worker thread.
    """

    __slots__ = ("abort_r", "abort_w", "c", "closed", "fifo_dir", "jobs", "lock", "prefix",
                 "share")

    def __init__(self, jobs: List[ActionJob], share: int, *,
                 env: Callable[[str], binding.Environment], stderr_cap: int,
                 runtime_dir: str | None) -> None:
        """SHARE: actions of this batch running at once; ENV(path): the environment
        for a PATH; RUNTIME_DIR: where the fifo directory goes (None: the default)."""
        self.jobs = jobs
        self.share = share
        envs: Dict[str, binding.Environment] = {}
        specs = []
        for i, job in enumerate(jobs):
            job.batch = self
            job.index = i
            got = envs.get(job.path)
            if got is None:
                got = envs[job.path] = env(job.path)
            specs.append((job.command, job.cap, got))
        self.c = binding.Batch(specs, stderr_cap)
        # Non-blocking both ends: C drains its end; the loop never blocks writing.
        self.abort_r, self.abort_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.lock = threading.Lock()
        self.closed = False
        self.fifo_dir = ""
        # Made here, on the loop, so a failure fails this batch's jobs (see
        # ActionRunner._flush); mode 0700, and made after -u dropped privileges.
        try:
            self.fifo_dir = _private_dir(runtime_dir or default_runtime_dir())
        except BaseException:
            self.close()
            raise
        self.prefix = os.fsencode(self.fifo_dir + "/")

    def run(self, shell: bytes, shared: binding.Shared, *, timeout: float, kill_grace: float,
            max_output: int, linger: float | None) -> Tuple[List[ActionResult], List[int]]:
        """Worker thread: run the batch in C; its ActionResults, and the pids of
        the shells still holding their output KILL_GRACE s after SIGKILL (to reap)."""
        try:
            self.c.run(
                shell,
                self.prefix,
                shared,
                self.abort_r,
                timeout_ms=min(_INT_MAX, max(1, math.ceil(timeout * 1000))),
                kill_grace_ms=min(_INT_MAX, math.ceil(kill_grace * 1000)),
                max_output=max_output,
                max_running=self.share,
                linger_ms=-1 if linger is None else min(_INT_MAX, math.ceil(linger * 1000)),
            )
        except OSError as err:
            raise ActionError("(batch)", f"cannot run actions: {err.strerror}") from err
        finally:
            self.close()
        out: List[ActionResult] = []
        unreaped: List[int] = []
        for i in range(len(self.jobs)):
            flags = self.c.flags(i)
            if flags & binding.UNREAPED and not flags & binding.SPAWN_ERROR:
                pid = self.c.pid(i)
                unreaped.append(pid)
                log.warning(
                    "child %d still holds its output %.0f s after SIGKILL; abandoning it",
                    pid,
                    kill_grace,
                )
            out.append(_convert(self, i))
        return out, unreaped

    def result(self, index: int) -> ActionResult:
        """Job INDEX's ActionResult; only once C is done with it (ended(INDEX))."""
        return _convert(self, index)

    def ended(self, index: int) -> bool:
        """True once C is done with job INDEX (its child killed and reaped, or never run)."""
        return self.closed or self.c.ended(index)

    def kill_now(self, index: int, until: float) -> None:
        """SIGKILL job INDEX's worker group from this thread; wait until UNTIL for C.

        While end_ns is 0 the pid (the job's worker shell) is our child,
        alive or a zombie, so it cannot have been reused: C reaps a killed
        or dead worker and stores end_ns a few instructions later (and Linux
        hands out pids in sequence up to pid_max before reusing one). If the
        job ends between the check and the kill, the worker may already run
        another job of the batch, which dies too: this is the stop path,
        where every action of the cycle is being cancelled anyway.
        """
        pid = self.c.pid(index)
        if not pid or self.ended(index):
            return
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except OSError:  # EPERM: a setuid child in the group; C kills the shell
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        while not self.ended(index) and time.monotonic() < until:
            time.sleep(0.0002)

    def abort(self, index: int | None) -> None:
        """Ask C to kill job INDEX (None: all of them); no-op once the batch ended."""
        data = binding.abort_message(index)
        with self.lock:
            if self.closed:
                return
            try:
                os.write(self.abort_w, data)
            except BlockingIOError:
                # 16384 requests not yet read: the job still ends at its timeout.
                log.warning("abort pipe full; action %s left to its timeout", index)

    def close(self) -> None:
        """Worker side, after C returned."""
        with self.lock:
            self.closed = True
            os.close(self.abort_r)
            os.close(self.abort_w)
        if self.fifo_dir:
            _remove_dir(self.fifo_dir)
