"""The action runner: scheduling of the actions' batches on asyncio (C runs them).

Imported only by code that runs actions (the daemon's runner factory, tests,
benchmarks), so rendering, substitution and the config load no compiled
module. Substitution of the action text is vhostmd_py.sources.shell.substitution;
the C batch runner (csrc/runner.c) is reached only through its binding,
vhostmd_py.sources.shell.binding. This module takes the jobs and makes the
batches; one batch (its C buffers, fifo directory, abort pipe, results) is
vhostmd_py.sources.shell.batch, the threads that run batches
vhostmd_py.sources.shell.threads, cancellation and reaping
vhostmd_py.sources.shell.stopping.

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
bash as /bin/sh ``$LINENO`` counts on across a worker's actions (docs/COMPATIBILITY.md,
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
import logging
import os
from typing import Callable, Dict, List, Mapping, Sequence, Set, Tuple

from vhostmd_py.config import DEFAULT_PATH
from vhostmd_py.errors import ActionError
from vhostmd_py.sources.shell import VALUE_CAP, binding
from vhostmd_py.sources.shell.batch import (
    ActionJob,
    ActionResult,
    Batch,
    default_runtime_dir,
    not_run,
)
from vhostmd_py.sources.shell.stopping import Stopper
from vhostmd_py.sources.shell.threads import BatchThreads

__all__ = [
    "DEFAULT_TIMEOUT",
    "ActionJob",
    "ActionResult",
    "ActionRunner",
    "default_batch_threads",
    "default_concurrency",
    "default_runtime_dir",
]

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
DEFAULT_SHELL = "/bin/sh"


def default_concurrency() -> int:
    """Default bound on actions running at once: min(32, 4 x CPUs)."""
    return min(32, 4 * (os.cpu_count() or 1))


def default_batch_threads() -> int:
    """Threads running batches at once: one per CPU, at most 4 (bench/README.md, Actions)."""
    return max(1, min(4, os.cpu_count() or 1))


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
        # Told each batch's results as it ends (the daemon's health counters).
        self.on_results: Callable[[Sequence[ActionResult]], None] | None = None
        self._shell = os.fsencode(shell)
        self._environ = dict(os.environ if environ is None else environ)
        self._envs: Dict[str, binding.Environment] = {}
        self._shared = binding.Shared(concurrency)
        self._pending: Dict[asyncio.AbstractEventLoop, List[ActionJob]] = {}
        self._stopper = Stopper()
        # A batch whose action outlives its cycle (the cycle publishes at
        # its deadline without it) keeps its thread until that action
        # ends (at worst its timeout); the next cycles' batches must not
        # queue behind it, so there are threads to spare: such a batch
        # holds a running action, i.e. one of max_concurrency slots.
        # Idle threads are reused: normally only batch_threads exist.
        self._threads = BatchThreads(threads + concurrency, self._execute, self._delivered)
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
                job.future.set_result(not_run("NUL character in command"))
                continue
            try:
                job.command = os.fsencode(command)
            except UnicodeEncodeError as err:  # lone surrogates: no bytes to exec
                job.future.set_result(not_run(f"command not encodable: {err}"))
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
            return not_run("cancelled")
        if outcome is not None:
            reason = outcome.reason if isinstance(outcome, ActionError) else str(outcome)
            return not_run(reason)
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
                job.future.set_result(batch.result(job.index))

    def worker_pids(self) -> Set[int]:
        """Pids of the worker shells of the batches running now (and of a few that ended).

        Read while C runs: a pid is stored when its worker's first job
        starts, so a worker spawned a few microseconds ago may be missing
        (vhostmd_py.sources.shell.orphans only ends a process seen as an orphan twice).
        """
        pids: Set[int] = set()
        for batch in self._threads.batches:
            pids.update(batch.c.started_pids())
        return pids

    async def cancel(self, jobs: Sequence[ActionJob]) -> None:
        """Kill JOBS (the daemon is stopping): none of their children outlives this call."""
        await self._stopper.cancel(jobs)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs = [j for j in self._pending.pop(loop, ()) if not j.future.done()]
        if not jobs:
            return
        self._stopper.reap()
        # WHY split: one poll loop per CPU shares our own per-action work
        # (fifos, reads, a few syscalls) between cores while the workers'
        # forks use them too; the shared counter keeps the total at
        # max_concurrency. Interleaved, so starts follow order.
        k = min(self.batch_threads, self.max_concurrency, len(jobs))
        share = -(-self.max_concurrency // k)
        for part in range(k):
            group = jobs[part::k]
            try:
                batch = Batch(group, share, env=self._env, stderr_cap=self.stderr_cap,
                              runtime_dir=self.runtime_dir)
                self._threads.submit(loop, batch)
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

    def _delivered(self, results: Sequence[ActionResult]) -> None:
        if self.on_results is not None:
            self.on_results(results)  # the health counters (endpoint), once per batch

    def _env(self, path: str) -> binding.Environment:
        env = self._envs.get(path)
        if env is None:
            env = self._envs[path] = binding.Environment({**self._environ, "PATH": path})
        return env

    def _execute(self, batch: Batch) -> List[ActionResult]:
        """Worker thread: run the batch in C, turn its results into ActionResults."""
        results, unreaped = batch.run(
            self._shell,
            self._shared,
            timeout=self.timeout,
            kill_grace=self.kill_grace,
            max_output=self.max_output,
            linger=self.linger,
        )
        self._stopper.abandoned(unreaped)
        return results

    def cancel_all(self) -> None:
        """Kill every running action now (their metrics fail as cancelled); call on the loop."""
        for batch in list(self._threads.batches):
            batch.abort(None)

    def close(self) -> None:
        """Kill running actions and reap what was left (blocking briefly)."""
        self.cancel_all()
        self._threads.shutdown()
        self._pending.clear()  # jobs of a loop that ended before its flush
        self._stopper.reap_all(within=2.0)
