"""The action runner: scheduling of the actions' batches on asyncio (C runs them).

Imported only by code that runs actions (the daemon's runner factory, tests,
benchmarks), so rendering, substitution and the config load no compiled
module. Substitution of the action text is vhostmd_py.sources.shell.substitution;
the C batch runner (csrc/runner.c) is reached only through its binding,
vhostmd_py.sources.shell.binding.

Running: each batch starts a few worker shells (``/bin/sh -s``, at most
``max_concurrency`` across batches), each leading its own session, and runs
every action in a subshell of one of them: ``( eval ' CMD' )`` with stdin
``/dev/null`` and stdout/stderr on two fifos made fresh for that action in a
private directory (``runtime_dir``). The same /bin/sh parses CMD once, as
``sh -c CMD`` would; a timeout or a stop kills the worker's whole process
group with one ``killpg``; SIGPIPE/SIGXFSZ are at their defaults; one poll()
loop per batch runs in a worker thread with the GIL released. WHY: with one
shell command per metric per VM (3000 per cycle for perf-echo3 x 1000
domains), an exec per action cost ~0.75 ms of CPU on the measured VMs (libc
start-up traps to the hypervisor), and the children alone needed all of 2
cores; a fork of a running shell costs less than half (bench/README.md,
Cycle). What differs from upstream's fresh ``sh -c`` per action: ``$$`` is
the worker's pid, an action whose shell dies of signal N is reported with
exit status 128+N (the worker's ``$?``), an action that kills ``$$`` kills
its worker (reported with the worker's wait status), background leftovers
share the worker's process group (a later timeout there ends them), and with
bash as /bin/sh ``$LINENO`` counts on across a worker's actions (README,
Deviations).
The environment is the daemon's with PATH replaced by the config's
``<path>`` (upstream setenv()s PATH in its own environment before popen()).

Done when: both fifos are closed and the worker reported the exit status;
once the status is in, the fifos get ``linger`` seconds more, then what was
read is the output and what the action left in its worker's process group
(a ``sleep 1000 &`` holding its stdout: upstream's read() waits for ever) is
killed (``ActionResult.lingered``).
Results per action: ``submit_many()`` returns one ``ActionJob`` per command
at once; C stores each job's end (``end_ns``, atomically, last) as it comes,
so ``collect_ready()`` can hand out the results of the jobs that ended while
others of their batch still run (the collector's cycle deadline).
Failures (exit status != 0, signal, timeout, output over ``max_output``,
cancellation) make the metric absent for the cycle (upstream leaves out a
metric whose action fails). Bounds: ``timeout`` per action from its start
(then SIGKILL to the
process group; after ``kill_grace`` more seconds we stop waiting for the
fifos), only the first ``cap`` bytes of stdout and ``stderr_cap`` bytes of
stderr are kept, and at most ``max_output`` bytes are read from either before
the action is killed; at most ``max_concurrency`` actions run at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import signal
import threading
import time
from typing import Callable, Dict, List, Mapping, NamedTuple, Sequence, Set, Tuple

from vhostmd_py.config import DEFAULT_PATH
from vhostmd_py.errors import ActionError
from vhostmd_py.sources.shell import VALUE_CAP, binding

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
# Output beyond the value cap is read and thrown away up to this bound; past it
# the action is killed and the metric left out (upstream closes the pipe after
# its one read, so such a command dies of SIGPIPE and the metric is left out too).
DEFAULT_MAX_OUTPUT = 1024 * 1024
DEFAULT_STDERR_CAP = 4096
# After SIGKILL, how long we wait for the output fifos to close before giving up.
KILL_GRACE = 2.0
# After the action's exit status arrived, how long its output may stay open (a
# background child holding its stdout) before we take what was read and kill
# what it left in its process group. Upstream waits for EOF for ever.
LINGER = 0.5
# A cancelled run() waits at most this long for its child to be killed and
# reaped (the daemon allows a cancelled cycle 1.2 s: daemon.CANCEL_GRACE).
CANCEL_WAIT = 1.0
# ... of which at most this long blocking the loop, for all the actions one
# cancellation burst ends together (the stop path only).
CANCEL_SPIN = 0.05
DEFAULT_SHELL = "/bin/sh"


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
        import stat  # here: this helper is the only part of the runner that needs it

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


def default_concurrency() -> int:
    """Default bound on actions running at once: min(32, 4 x CPUs)."""
    return min(32, 4 * (os.cpu_count() or 1))


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


def _not_run(reason: str) -> ActionResult:
    """The result of an action that could not be started."""
    return ActionResult(None, b"", 0, b"", 0.0, spawn_error=reason)


def _convert(batch: _Batch, i: int) -> ActionResult:
    """Job I's ActionResult from the C result and buffers of BATCH (C is done with it)."""
    flags, status, error, out, out_total, err, start_ns, end_ns = batch.c.raw(i)
    if flags & binding.SPAWN_ERROR:
        return _not_run(os.strerror(error))
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


def default_batch_threads() -> int:
    """Threads running batches at once: one per CPU, at most 4 (bench/README.md, Actions)."""
    return max(1, min(4, os.cpu_count() or 1))


class ActionJob:
    """One submitted action: ``future`` gets its ActionResult (see submit_many)."""

    __slots__ = ("batch", "cap", "command", "future", "index", "path", "submitted")

    def __init__(self, command: bytes, cap: int, path: str, future: asyncio.Future[ActionResult]):
        self.command = command
        self.cap = cap
        self.path = path
        self.future = future
        self.batch: _Batch | None = None
        self.index = 0
        self.submitted = time.monotonic()

    def done(self) -> bool:
        """True once the result is in ``future``."""
        return self.future.done()


_Job = ActionJob


class _Batch:
    """The jobs of one vh_run_batch() call, its C buffers and its abort pipe.

    The pipe is per batch so that an index written for a job of an ended
    batch can never kill a job of the next one; writes and the close are
    under one lock because they come from the loop and the worker thread.
    """

    __slots__ = ("abort_r", "abort_w", "c", "closed", "fifo_dir", "jobs", "lock", "prefix",
                 "share")

    def __init__(self, runner: ActionRunner, jobs: List[_Job], share: int) -> None:
        self.jobs = jobs
        self.share = share
        envs: Dict[str, binding.Environment] = {}
        specs = []
        for i, job in enumerate(jobs):
            job.batch = self
            job.index = i
            env = envs.get(job.path)
            if env is None:
                env = envs[job.path] = runner._env(job.path)
            specs.append((job.command, job.cap, env))
        self.c = binding.Batch(specs, runner.stderr_cap)
        # Non-blocking both ends: C drains its end; the loop never blocks writing.
        self.abort_r, self.abort_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.lock = threading.Lock()
        self.closed = False
        self.fifo_dir = ""
        # Made here, on the loop, so a failure fails this batch's jobs (see
        # _flush); mode 0700, and made after -u dropped privileges.
        try:
            self.fifo_dir = _private_dir(runner.runtime_dir or default_runtime_dir())
        except BaseException:
            self.close()
            raise
        self.prefix = os.fsencode(self.fifo_dir + "/")

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


class ActionRunner:
    """Runs actions as ``/bin/sh`` would with ``-c``: bounded, timed out, killable.

    ``path`` is the actions' PATH (the config's ``<path>``), ``uri`` the libvirt
    URI that ``CONNECT`` stands for (None: CONNECT becomes empty).
    ``runtime_dir`` is where each batch makes the private directory of its
    actions' output fifos (removed when the batch ends); None:
    default_runtime_dir().

    Batching: run() queues its job; the run() calls made in one event loop
    iteration (a cycle's asyncio.gather of every metric of every VM) are split
    into up to ``batch_threads`` interleaved batches, each run by
    csrc/runner.c in its own worker thread with the GIL released;
    ``max_concurrency`` bounds the actions running across all of them (a
    counter shared with C).
    """

    def __init__(
        self,
        *,
        path: str = DEFAULT_PATH,
        uri: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_concurrency: int | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
        stderr_cap: int = DEFAULT_STDERR_CAP,
        shell: str = DEFAULT_SHELL,
        environ: Mapping[str, str] | None = None,
        kill_grace: float = KILL_GRACE,
        batch_threads: int | None = None,
        runtime_dir: str | None = None,
        linger: float | None = LINGER,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        concurrency = default_concurrency() if max_concurrency is None else max_concurrency
        if concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        threads = default_batch_threads() if batch_threads is None else batch_threads
        if threads < 1:
            raise ValueError("batch_threads must be at least 1")
        if max_output < 0 or stderr_cap < 0 or kill_grace < 0 or (linger is not None
                                                                  and linger < 0):
            raise ValueError(
                "max_output, stderr_cap, kill_grace and linger must not be negative"
            )
        self.path = path
        self.uri = uri
        self.timeout = timeout
        self.max_concurrency = concurrency
        self.max_output = max_output
        self.stderr_cap = stderr_cap
        self.shell = shell
        self.kill_grace = kill_grace
        self.linger = linger  # None: wait for EOF until the timeout
        self.batch_threads = threads
        # Told each batch's results as it ends (the daemon's health counters, issue 15).
        self.on_results: Callable[[Sequence[ActionResult]], None] | None = None
        self._shell = os.fsencode(shell)
        self._environ = dict(os.environ if environ is None else environ)
        self._envs: Dict[str, binding.Environment] = {}
        self._shared = binding.Shared(concurrency)
        self._pending: Dict[asyncio.AbstractEventLoop, List[ActionJob]] = {}
        self._batches: Set[_Batch] = set()
        self._unreaped: Set[int] = set()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._spin_until = 0.0
        self.runtime_dir = runtime_dir

    @property
    def fd_need(self) -> int:
        """File descriptors the runner may hold at once: per running action its
        worker's two pipes, two fifos and a pidfd; per batch thread an abort
        pipe and /dev/null. The daemon keeps this much free (virtio reserves
        it beside its channels); short of it, actions wait for others to end."""
        return 5 * self.max_concurrency + 3 * self.batch_threads

    @property
    def running(self) -> int:
        """Number of children running now."""
        return self._shared.running

    async def run(
        self, command: str, *, cap: int = VALUE_CAP, path: str | None = None
    ) -> ActionResult:
        """Run COMMAND as ``/bin/sh -c`` would; keep the first CAP bytes of its stdout."""
        return (await self.run_many([(command, cap)], path=path))[0]

    async def run_many(
        self, commands: Sequence[Tuple[str, int]], *, path: str | None = None
    ) -> List[ActionResult]:
        """Run each (COMMAND, CAP) of COMMANDS; their results, in order.

        One gather() over the jobs' futures, no task per action: a cycle of
        3000 actions costs 3000 small job records instead of 3000 asyncio
        tasks (~2.5 MB and their scheduling; bench/README.md, Cycle). A batch that cannot be started
        (EMFILE, no fifo directory) gives its actions a ``spawn_error``.
        Cancelled: every action of COMMANDS is killed before this returns.
        """
        jobs = self.submit_many(commands, path=path)
        try:
            await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        except asyncio.CancelledError:
            await self.cancel(jobs)
            raise
        return [self.result_of(j) for j in jobs]

    def submit_many(
        self, commands: Sequence[Tuple[str, int]], *, path: str | None = None
    ) -> List[ActionJob]:
        """Queue each (COMMAND, CAP) of COMMANDS; one ActionJob each, in order (on the loop).

        Every submit of one loop iteration joins one batch. A job's future is
        resolved when its batch ends, or earlier by collect_ready() once C
        reports the job over; an unrunnable command's future is resolved at
        once. Nobody waiting does not stop a job: it runs to its end or its
        timeout (cancel() or cancel_all() kill it).
        """
        loop = asyncio.get_running_loop()
        job_path = self.path if path is None else path
        out: List[ActionJob] = []
        queued: List[ActionJob] = []
        for command, cap in commands:
            job = ActionJob(b"", cap, job_path, loop.create_future())
            out.append(job)
            if "\x00" in command:
                job.future.set_result(_not_run("NUL character in command"))
                continue
            try:
                job.command = os.fsencode(command)
            except UnicodeEncodeError as err:  # lone surrogates: no bytes to exec
                job.future.set_result(_not_run(f"command not encodable: {err}"))
                continue
            queued.append(job)
        if queued:
            pending = self._pending.get(loop)
            if pending is None:
                pending = self._pending[loop] = []
                # Every submit of this loop iteration joins the batch (FIFO:
                # the tasks a gather() created all run before this).
                loop.call_soon(self._flush, loop)
            pending.extend(queued)
        return out

    @staticmethod
    def result_of(job: ActionJob) -> ActionResult:
        """The result of a done JOB (a batch that could not run: a spawn_error result)."""
        outcome = job.future.exception() if not job.future.cancelled() else None
        if job.future.cancelled():
            return _not_run("cancelled")
        if outcome is not None:
            reason = outcome.reason if isinstance(outcome, ActionError) else str(outcome)
            return _not_run(reason)
        return job.future.result()

    def collect_ready(self, jobs: Sequence[ActionJob]) -> None:
        """Resolve the futures of JOBS that C has finished although their batch runs on.

        C stores a job's end_ns last and atomically, after its output and
        status (csrc/runner.c, finish_job): a non-zero end_ns means the
        result is complete and C never touches it again.
        """
        for job in jobs:
            batch = job.batch
            if batch is None or job.future.done():
                continue
            if batch.c.ended(job.index):
                job.future.set_result(_convert(batch, job.index))

    def worker_pids(self) -> Set[int]:
        """Pids of the worker shells of the batches running now (and of a few that ended).

        Read while C runs: a pid is stored when its worker's first job
        starts, so a worker spawned a few microseconds ago may be missing
        (vhostmd_py.sources.shell.orphans only ends a process seen as an orphan twice).
        """
        pids: Set[int] = set()
        for batch in self._batches:
            pids.update(batch.c.started_pids())
        return pids

    async def cancel(self, jobs: Sequence[ActionJob]) -> None:
        """Kill JOBS (the daemon is stopping): none of their children outlives this call.

        asyncio.gather() ends at the FIRST cancelled child, so what must be
        true when the cycle's cancellation completes is done here
        synchronously: abort, kill now and wait briefly for C to reap (a
        killed shell is gone in well under a millisecond); only a child
        stuck past that is waited for without blocking the loop (polling:
        this is the stop path only).
        """
        for job in jobs:
            if job.batch is None and not job.future.done():
                job.future.cancel()  # not flushed yet: _flush skips it
        started = [j for j in jobs if j.batch is not None]
        mine: Dict[_Batch, int] = {}
        for job in started:
            assert job.batch is not None
            mine[job.batch] = mine.get(job.batch, 0) + 1
        for batch, count in mine.items():
            if count == len(batch.jobs):
                batch.abort(None)  # one write for the whole batch
            else:
                for job in started:
                    if job.batch is batch:
                        batch.abort(job.index)
        now = time.monotonic()
        if now >= self._spin_until:
            # One budget per burst: a stopping cycle cancels every action in
            # the same loop iteration.
            self._spin_until = now + CANCEL_SPIN
        for job in started:
            assert job.batch is not None
            job.batch.kill_now(job.index, self._spin_until)
        deadline = time.monotonic() + CANCEL_WAIT
        for job in started:
            assert job.batch is not None
            while not job.batch.ended(job.index) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs = [j for j in self._pending.pop(loop, ()) if not j.future.done()]
        if not jobs:
            return
        self._reap_orphans()
        if self._pool is None:
            # A batch whose action outlives its cycle (the cycle publishes at
            # its deadline without it) keeps its thread until that action
            # ends (at worst its timeout); the next cycles' batches must not
            # queue behind it, so there are threads to spare: such a batch
            # holds a running action, i.e. one of max_concurrency slots.
            # Idle threads are reused: normally only batch_threads exist.
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.batch_threads + self.max_concurrency,
                thread_name_prefix="vhostmd-actions",
            )
        # WHY split: one poll loop per CPU shares our own per-action work
        # (fifos, reads, a few syscalls) between cores while the workers'
        # forks use them too; the shared counter keeps the total at
        # max_concurrency. Interleaved, so starts follow order.
        k = min(self.batch_threads, self.max_concurrency, len(jobs))
        share = -(-self.max_concurrency // k)
        for part in range(k):
            group = jobs[part::k]
            try:
                self._submit(loop, _Batch(self, group, share))
            except Exception as err:
                # Called from call_soon: an exception here would only reach
                # asyncio's handler and leave these futures pending for ever,
                # and with them the cycle (EMFILE on pipe2 is plausible with
                # a thousand virtio sockets open).
                log.error("cannot start %d action(s): %s", len(group), err)
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(
                            ActionError("(batch)", f"cannot start the batch: {err}")
                        )

    def _submit(self, loop: asyncio.AbstractEventLoop, batch: _Batch) -> None:
        assert self._pool is not None
        self._batches.add(batch)
        try:
            done = self._pool.submit(self._execute, batch)
        except BaseException:
            self._batches.discard(batch)
            batch.close()
            raise

        def deliver(fut: concurrent.futures.Future[List[ActionResult]]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(self._deliver, batch, fut)

        done.add_done_callback(deliver)

    def _deliver(self, batch: _Batch, fut: concurrent.futures.Future[List[ActionResult]]) -> None:
        self._batches.discard(batch)
        error = fut.exception()
        if error is None and self.on_results is not None:
            self.on_results(fut.result())  # the health counters (endpoint), once per batch
        jobs, batch.jobs = batch.jobs, []
        for index, job in enumerate(jobs):
            if job.future.done():
                continue
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(fut.result()[index])
        # batch.jobs <-> job.batch was a reference cycle: left to the cyclic
        # collector, a cycle's batches (their C buffers, jobs and futures)
        # lived on into the next cycles and raised the daemon's peak memory.

    def _env(self, path: str) -> binding.Environment:
        env = self._envs.get(path)
        if env is None:
            env = self._envs[path] = binding.Environment({**self._environ, "PATH": path})
        return env

    def _execute(self, batch: _Batch) -> List[ActionResult]:
        """Worker thread: run the batch in C, turn its results into ActionResults."""
        try:
            batch.c.run(
                self._shell,
                batch.prefix,
                self._shared,
                batch.abort_r,
                timeout_ms=min(_INT_MAX, max(1, math.ceil(self.timeout * 1000))),
                kill_grace_ms=min(_INT_MAX, math.ceil(self.kill_grace * 1000)),
                max_output=self.max_output,
                max_running=batch.share,
                linger_ms=(
                    -1 if self.linger is None else min(_INT_MAX, math.ceil(self.linger * 1000))
                ),
            )
        except OSError as err:
            raise ActionError("(batch)", f"cannot run actions: {err.strerror}") from err
        finally:
            batch.close()
        out: List[ActionResult] = []
        for i in range(len(batch.jobs)):
            flags = batch.c.flags(i)
            if flags & binding.UNREAPED and not flags & binding.SPAWN_ERROR:
                pid = batch.c.pid(i)
                self._unreaped.add(pid)
                log.warning(
                    "child %d still holds its output %.0f s after SIGKILL; abandoning it",
                    pid,
                    self.kill_grace,
                )
            out.append(_convert(batch, i))
        return out

    def _reap_orphans(self) -> None:
        # Shells given up on after the kill grace: reap them now so they do
        # not stay zombies.
        for pid in list(self._unreaped):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._unreaped.discard(pid)

    def cancel_all(self) -> None:
        """Kill every running action now (their metrics fail as cancelled); call on the loop."""
        for batch in list(self._batches):
            batch.abort(None)

    def close(self) -> None:
        """Kill running actions and reap what was left (blocking briefly)."""
        self.cancel_all()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._batches.clear()
        self._pending.clear()  # jobs of a loop that ended before its flush
        deadline = time.monotonic() + 2.0
        while self._unreaped and time.monotonic() < deadline:
            self._reap_orphans()
            if self._unreaped:
                time.sleep(0.01)
