"""Metric actions: token substitution and running ``/bin/sh -c`` cheaply and safely.

Substitution (SPEC section 2). Upstream replaces every plain-text occurrence
of ``CONNECT`` (always) and ``NAME``, ``VMID``, ``UUID`` (vm context only) one
token after the other over the whole string, so a VM named ``UUID`` gets its
name replaced again, and a VM named ``$(touch x)`` runs ``touch x`` (upstream
bugs). Here all tokens, plus a whole-word ``ID`` (the seed documentation's
name for the id), are replaced in ONE pass that never re-scans inserted text.
A value made only of characters the shell treats literally is inserted
verbatim, so commands for normal names, ids, UUIDs and URIs are byte-identical
to upstream's. Any other value is quoted for the quoting context the token sits
in (found by a small lexer of the action text); when the lexer cannot be sure
of the context (command substitution, backticks, here-documents, comments,
after a backslash, unbalanced quotes) the metric is refused for that VM.

Running: each action is ``posix_spawn("/bin/sh", ["sh", "-c", cmd])`` in its
own session (so a timeout or a stop kills the whole process tree with one
``killpg``), stdin ``/dev/null``, stdout and stderr raw non-blocking pipes
watched by the event loop; the spawn itself runs in a few worker threads
(see _LibcSpawner). bench/bench_actions.py, 3000 `echo` actions on 2 cores:
asyncio's subprocess machinery took 3.1x the wall time and 1.8x our CPU per
action. The environment is the daemon's with PATH replaced by the config's
``<path>`` (upstream setenv()s PATH in its own environment before popen()).

Done when: both pipes are closed and the shell is reaped. Failures (exit
status != 0, signal, timeout, output over ``max_output``, cancellation) make
the metric absent for the cycle (upstream leaves out a metric whose action
fails). Bounds: ``timeout`` per action (then SIGKILL to the process group;
after ``KILL_GRACE`` more seconds we stop waiting for the pipes), only the
first ``cap`` bytes of stdout and ``stderr_cap`` bytes of stderr are kept, and
at most ``max_output`` bytes are read from either before the action is killed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import logging
import os
import re
import shlex
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Set, Tuple

from .errors import ActionError
from .model import VM

log = logging.getLogger(__name__)

# Upstream reads at most this many bytes of an action's output (FACTS section 2:
# edge-4k `Long` and negsum-1k keep 255 bytes); xml metrics get 2047.
VALUE_CAP = 255
XML_VALUE_CAP = 2047
DEFAULT_TIMEOUT = 30.0
# Output beyond the value cap is read and thrown away up to this bound; past it
# the action is killed and the metric left out (upstream closes the pipe after
# its one read, so such a command dies of SIGPIPE and the metric is left out too).
DEFAULT_MAX_OUTPUT = 1024 * 1024
DEFAULT_STDERR_CAP = 4096
# After SIGKILL, how long we wait for the pipes to close before giving up.
KILL_GRACE = 2.0
DEFAULT_SHELL = "/bin/sh"
DEFAULT_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"
_READ_CHUNK = 65536


def default_concurrency() -> int:
    """Default bound on actions running at once: min(32, 4 x CPUs)."""
    return min(32, 4 * (os.cpu_count() or 1))


# --- substitution --------------------------------------------------------------

# Characters the shell never treats specially (no quoting, expansion, globbing,
# word splitting); covers libvirt names in practice, ids, UUIDs and usual URIs.
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.:@%+=,/-]+\Z")
_VM_TOKENS = re.compile(r"CONNECT|VMID|UUID|NAME|\bID\b")
# Upstream replaces only CONNECT in host context (edge-4k HostNameToken keeps
# `NAME VMID UUID` literally).
_HOST_TOKENS = re.compile(r"CONNECT")

UNQUOTED = "unquoted"
SINGLE = "single-quoted"
DOUBLE = "double-quoted"
UNSURE = "unsure"


@dataclass(frozen=True)
class _Template:
    """An action split at its tokens; literals has one more item than tokens."""

    literals: Tuple[str, ...]
    tokens: Tuple[Tuple[str, str, str], ...]  # (token, context, why-unsure)


def _lex(text: str) -> List[Tuple[str, str]]:
    """Quoting context before each character: (context, reason when UNSURE)."""
    n = len(text)
    out: List[Tuple[str, str]] = [(UNSURE, "")] * n
    # Frames: "U" top level, "P" ( ) subshell (transparent), "S" '...',
    # "D" "...", "C" $( ), "B" ${ }, "Q" backticks, "#" comment.
    stack: List[str] = ["U"]
    escaped: Dict[int, str] = {}
    i = 0
    while i < n:
        frames = [f for f in stack if f != "P"]
        if i in escaped:
            out[i] = (UNSURE, escaped[i])
        elif frames == ["U"]:
            out[i] = (UNQUOTED, "")
        elif frames == ["U", "S"]:
            out[i] = (SINGLE, "")
        elif frames == ["U", "D"]:
            out[i] = (DOUBLE, "")
        else:
            outer = [f for f in frames if f in "CBQ#"]
            out[i] = (UNSURE, _WHY[outer[0] if outer else frames[-1]])
        c = text[i]
        top = stack[-1]
        if top == "S":
            if c == "'":
                stack.pop()
            i += 1
            continue
        if top == "#":
            if c == "\n":
                stack.pop()
            i += 1
            continue
        if c == "\\":
            if i + 1 < n:
                out[i + 1] = (UNSURE, "it follows a backslash")
            i += 2
            continue
        if c == "$" and i + 1 < n:
            # `$NAME` is a variable name in upstream: quoting cannot make it mean anything.
            escaped[i + 1] = "it follows a $"
            nxt = text[i + 1]
            if nxt == "(":
                stack.append("C")
                i += 2
                continue
            if nxt == "{":
                stack.append("B")
                i += 2
                continue
        if c == "`":
            if top == "Q":
                stack.pop()
            else:
                stack.append("Q")
        elif top == "D":
            if c == '"':
                stack.pop()
        elif c == "'":
            stack.append("S")
        elif c == '"':
            stack.append("D")
        elif c == "(":
            stack.append("P")
        elif c == ")":
            if top in ("P", "C"):
                stack.pop()
            else:
                # Unbalanced (or a `case` pattern): stop trusting anything after.
                return _rest_unsure(out, i + 1, "the parentheses are unbalanced")
        elif c == "}" and top == "B":
            stack.pop()
        elif c == "#" and (i == 0 or text[i - 1] in " \t\n;&|()"):
            stack.append("#")
        elif c == "<" and text.startswith("<<", i):
            return _rest_unsure(out, i + 1, "it is in a here-document")
        i += 1
    if stack[-1] == "#":
        stack.pop()
    if [f for f in stack if f != "P"] != ["U"]:
        return _rest_unsure(out, 0, "the quotes or parentheses are unbalanced")
    return out


_WHY = {
    "C": "it is inside $(...)",
    "B": "it is inside ${...}",
    "Q": "it is inside backticks",
    "#": "it is in a comment",
    "S": "it is in nested quotes",
    "D": "it is in nested quotes",
    "U": "it is nested",
}


def _rest_unsure(out: List[Tuple[str, str]], start: int, why: str) -> List[Tuple[str, str]]:
    for j in range(start, len(out)):
        out[j] = (UNSURE, why)
    return out


@functools.lru_cache(maxsize=4096)
def _template(action: str, vm_context: bool) -> _Template:
    pattern = _VM_TOKENS if vm_context else _HOST_TOKENS
    matches = list(pattern.finditer(action))
    if not matches:
        return _Template((action,), ())
    contexts = _lex(action)
    literals: List[str] = []
    tokens: List[Tuple[str, str, str]] = []
    pos = 0
    for m in matches:
        literals.append(action[pos : m.start()])
        ctx, why = contexts[m.start()]
        tokens.append((m.group(), ctx, why))
        pos = m.end()
    literals.append(action[pos:])
    return _Template(tuple(literals), tuple(tokens))


def _quote_for(value: str, ctx: str) -> str:
    if ctx == UNQUOTED:
        return shlex.quote(value)
    if ctx == SINGLE:
        # Close the quote, emit the value quoted on its own, reopen.
        return "'" + shlex.quote(value) + "'"
    # DOUBLE: only these four are special between double quotes.
    return re.sub(r'([$`"\\])', r"\\\1", value)


def substitute(action: str, vm: VM | None, uri: str | None, *, metric: str = "") -> str:
    """The command for VM (None = host context); ActionError when it cannot be made safe."""
    tpl = _template(action, vm is not None)
    if not tpl.tokens:
        return action
    parts = [tpl.literals[0]]
    for (token, ctx, why), literal in zip(tpl.tokens, tpl.literals[1:]):
        parts.append(_token_value(token, ctx, why, vm, uri, metric))
        parts.append(literal)
    return "".join(parts)


def _token_value(
    token: str, ctx: str, why: str, vm: VM | None, uri: str | None, metric: str
) -> str:
    vm_name = vm.name if vm is not None else None
    if token == "CONNECT":
        if not uri:
            return ""
        if _SAFE_VALUE.match(uri):
            return f"--connect '{uri}'"  # upstream's exact text
        if ctx == UNQUOTED:
            return "--connect " + shlex.quote(uri)
        raw, what = f"--connect '{uri}'", "the libvirt URI"
    else:
        assert vm is not None
        if token == "NAME":
            raw, what = vm.name, "the VM name"
        elif token == "UUID":
            raw, what = vm.uuid, "the VM UUID"
        else:  # VMID, ID
            raw, what = str(vm.id), "the VM id"
        if _SAFE_VALUE.match(raw):
            return raw
    if "\x00" in raw:
        raise ActionError(metric, f"{what} contains a NUL character", vm_name)
    if ctx == UNSURE:
        raise ActionError(
            metric,
            f"refusing to substitute {token} with {what} {raw!r}: it needs quoting and {why}",
            vm_name,
        )
    return _quote_for(raw, ctx)


# --- running ---------------------------------------------------------------------


@dataclass(frozen=True)
class ActionResult:
    """What one action did."""

    returncode: int | None  # exit status, -N when killed by signal N, None if not run
    stdout: bytes  # the first `cap` bytes
    stdout_size: int  # all bytes seen (read and discarded past the cap)
    stderr: bytes  # the first stderr_cap bytes
    duration: float
    timed_out: bool = False
    overflow: bool = False  # output exceeded max_output: killed
    cancelled: bool = False
    spawn_error: str | None = None

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


class _Proc:
    """Book-keeping for one running child (callbacks run on the loop)."""

    __slots__ = (
        "cancelled",
        "cap",
        "err",
        "err_fd",
        "err_len",
        "future",
        "killed",
        "open_fds",
        "out",
        "out_fd",
        "out_len",
        "overflow",
        "pid",
        "pidfd",
        "runner",
        "timed_out",
    )

    def __init__(self, runner: ActionRunner, pid: int, out_fd: int, err_fd: int, cap: int) -> None:
        self.runner = runner
        self.pid = pid
        self.out_fd = out_fd
        self.err_fd = err_fd
        self.cap = cap
        self.out: List[bytes] = []
        self.err: List[bytes] = []
        self.out_len = 0
        self.err_len = 0
        self.open_fds = 2
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.timed_out = False
        self.overflow = False
        self.cancelled = False
        self.killed = False
        self.pidfd = -1

    def on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop = asyncio.get_running_loop()
            loop.remove_reader(fd)
            self.open_fds -= 1
            if self.open_fds == 0:
                self._outputs_closed()
            return
        if fd == self.out_fd:
            if self.out_len < self.cap:
                self.out.append(data)
            self.out_len += len(data)
            total = self.out_len
        else:
            if self.err_len < self.runner.stderr_cap:
                self.err.append(data)
            self.err_len += len(data)
            total = self.err_len
        if total > self.runner.max_output and not self.killed:
            self.overflow = True
            self.kill()

    def _outputs_closed(self) -> None:
        # Both pipes closed: the shell has (almost always) exited.
        if self.runner._reap(self):
            self._finish()
            return
        pidfd_open = getattr(os, "pidfd_open", None)
        loop = asyncio.get_running_loop()
        if pidfd_open is not None:
            try:
                self.pidfd = pidfd_open(self.pid)
            except OSError:
                self.pidfd = -1
            if self.pidfd >= 0:
                loop.add_reader(self.pidfd, self._on_exit)
                return
        loop.call_later(0.01, self._outputs_closed)

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        self.runner._reap(self)
        self._finish()

    def _give_up(self) -> None:
        if self.future.done():
            return
        log.warning(
            "child %d still holds its output %.0f s after SIGKILL; abandoning it",
            self.pid,
            KILL_GRACE,
        )
        if not self.runner._reap(self):
            self.runner._unreaped.add(self.pid)
        self._finish()

    def _finish(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def on_timeout(self) -> None:
        if not self.future.done():
            self.timed_out = True
            self.kill()

    def kill(self) -> None:
        """SIGKILL the child's whole process group (it runs in its own session)."""
        loop = self.future.get_loop()
        if not self.killed and not loop.is_closed():
            # A process in uninterruptible sleep, or a grandchild that left the
            # session holding our pipe, would otherwise keep the cycle waiting
            # for an EOF that never comes.
            loop.call_later(KILL_GRACE, self._give_up)
        self.killed = True
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except OSError as err:  # EPERM: a setuid child; kill what we can
            log.debug("killpg(%d) failed: %s", self.pid, err)
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)

    def cleanup(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in (self.out_fd, self.err_fd):
            loop.remove_reader(fd)
            os.close(fd)
        if self.pidfd >= 0:
            loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1


# Children get the default action for these although Python ignores SIGPIPE
# (and SIGXFSZ): a pipeline like `virsh ... | head -1` must end the way it does
# from a shell (upstream's commands died of SIGPIPE, FACTS section 2).
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


def default_spawn_threads() -> int:
    """Threads that call posix_spawn: two per CPU (they mostly wait for exec), 2..8."""
    return max(2, min(8, 2 * (os.cpu_count() or 1)))


class _LibcSpawner:
    """glibc posix_spawn through ctypes, called from worker threads.

    WHY: os.posix_spawn holds the GIL, and glibc's posix_spawn (vfork
    semantics) returns only once the child has exec'ed; with a 1 ms exec
    that serialises every spawn with the event loop (measured: the loop spent
    ~87% of an echo3 x 1000 cycle blocked in os.posix_spawn). A ctypes call
    releases the GIL, so a few threads overlap several execs with the loop.
    """

    # <spawn.h> flags (glibc, all architectures).
    SETSIGDEF = 0x04
    SETSIGMASK = 0x08
    SETSID = 0x80
    _BUF = 1024  # opaque posix_spawn*_t / sigset_t are < 400 bytes on glibc

    def __init__(self, libc: ctypes.CDLL) -> None:
        # Only posix_spawn itself (which waits for the child's exec) needs to
        # release the GIL; the cheap setup calls keep it (PyDLL), which avoids
        # a GIL hand-off per call between the spawner threads and the loop.
        self._libc = libc
        self._fast = ctypes.PyDLL(None)
        self._sigdef = ctypes.create_string_buffer(self._BUF)
        self._sigmask = ctypes.create_string_buffer(self._BUF)
        libc.sigemptyset(self._sigdef)
        for sig in _DEFAULT_SIGNALS:
            libc.sigaddset(self._sigdef, int(sig))
        libc.sigemptyset(self._sigmask)
        self._devnull = os.fsencode(os.devnull)
        # The attributes are the same for every child and posix_spawn only
        # reads them: build them once, share them between threads.
        self._attr = ctypes.create_string_buffer(self._BUF)
        _check(libc.posix_spawnattr_init(self._attr))
        _check(libc.posix_spawnattr_setsigdefault(self._attr, self._sigdef))
        _check(libc.posix_spawnattr_setsigmask(self._attr, self._sigmask))
        flags = ctypes.c_short(self.SETSID | self.SETSIGDEF | self.SETSIGMASK)
        _check(libc.posix_spawnattr_setflags(self._attr, flags))

    @classmethod
    def load(cls) -> _LibcSpawner | None:
        """The spawner, or None where libc is not glibc (fall back to os.posix_spawn)."""
        try:
            if not os.confstr("CS_GNU_LIBC_VERSION"):
                return None
            return cls(ctypes.CDLL(None, use_errno=True))
        except (OSError, ValueError, AttributeError):
            return None

    def spawn(
        self,
        shell: bytes,
        command: bytes,
        envp: ctypes.Array[ctypes.c_char_p],
        out_w: int,
        err_w: int,
    ) -> int:
        """posix_spawn(shell, ["sh", "-c", command]) in a new session; the pid."""
        fast = self._fast
        actions = ctypes.create_string_buffer(self._BUF)
        _check(fast.posix_spawn_file_actions_init(actions))
        try:
            _check(fast.posix_spawn_file_actions_addopen(actions, 0, self._devnull, os.O_RDONLY, 0))
            _check(fast.posix_spawn_file_actions_adddup2(actions, out_w, 1))
            _check(fast.posix_spawn_file_actions_adddup2(actions, err_w, 2))
            argv = (ctypes.c_char_p * 4)(b"sh", b"-c", command, None)
            pid = ctypes.c_int(0)
            rc = self._libc.posix_spawn(ctypes.byref(pid), shell, actions, self._attr, argv, envp)
            _check(rc)
            return pid.value
        finally:
            fast.posix_spawn_file_actions_destroy(actions)


def _check(rc: int) -> None:
    # posix_spawn* return the error number instead of setting errno.
    if rc != 0:
        raise OSError(rc, os.strerror(rc))


class _SpawnJob:
    """One spawn in a worker thread, and who cleans up after it.

    A cancelled caller cannot interrupt posix_spawn; whichever side sees the
    other finished (the thread, or the cancelled caller) closes the pipes'
    write ends and kills what was started, exactly once, even when the event
    loop is already gone.
    """

    __slots__ = ("abandoned", "done", "err_w", "lock", "out_w", "pid", "runner")

    def __init__(self, runner: ActionRunner, out_w: int, err_w: int) -> None:
        self.runner = runner
        self.out_w = out_w
        self.err_w = err_w
        self.lock = threading.Lock()
        self.done = False
        self.abandoned = False
        self.pid: int | None = None

    def run(
        self,
        libc: _LibcSpawner,
        shell: bytes,
        command: bytes,
        envp: ctypes.Array[ctypes.c_char_p],
    ) -> int:
        """Worker thread: spawn; clean up at once if the caller is gone."""
        try:
            pid = libc.spawn(shell, command, envp, self.out_w, self.err_w)
            self.pid = pid
            return pid
        finally:
            with self.lock:
                self.done = True
                if self.abandoned:
                    self._cleanup()

    def abandon(self) -> None:
        """Loop side, on cancellation."""
        with self.lock:
            self.abandoned = True
            if self.done:
                self._cleanup()

    def release(self) -> None:
        """Loop side, spawn finished (or failed) normally: close the write ends."""
        os.close(self.out_w)
        os.close(self.err_w)

    def _cleanup(self) -> None:
        os.close(self.out_w)
        os.close(self.err_w)
        if self.pid is not None:
            self.runner._kill_abandoned(self.pid)


class ActionRunner:
    """Runs actions as ``/bin/sh -c`` children: bounded, timed out, killable.

    ``path`` is the actions' PATH (the config's ``<path>``), ``uri`` the libvirt
    URI that ``CONNECT`` stands for (None: CONNECT becomes empty).
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
        clock: Callable[[], float] | None = None,
        spawn_threads: int | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        concurrency = default_concurrency() if max_concurrency is None else max_concurrency
        if concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.path = path
        self.uri = uri
        self.timeout = timeout
        self.max_concurrency = concurrency
        self.max_output = max_output
        self.stderr_cap = stderr_cap
        self.shell = shell
        self._environ = dict(os.environ if environ is None else environ)
        self._envs: Dict[str, Dict[str, str]] = {}
        self._clock = clock or time.monotonic
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None
        self._running: Set[_Proc] = set()
        self._unreaped: Set[int] = set()
        self._status: Dict[int, int] = {}
        self.spawn_threads = default_spawn_threads() if spawn_threads is None else spawn_threads
        self._libc: _LibcSpawner | None = None
        self._libc_loaded = False
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._envps: Dict[str, ctypes.Array[ctypes.c_char_p]] = {}

    @property
    def running(self) -> int:
        """Number of children running now."""
        return len(self._running)

    def _env(self, path: str) -> Dict[str, str]:
        env = self._envs.get(path)
        if env is None:
            env = dict(self._environ)
            env["PATH"] = path
            self._envs[path] = env
        return env

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:
            self._sem = asyncio.Semaphore(self.max_concurrency)
            self._sem_loop = loop
        return self._sem

    async def run(
        self, command: str, *, cap: int = VALUE_CAP, path: str | None = None
    ) -> ActionResult:
        """Run COMMAND with ``/bin/sh -c``; keep the first CAP bytes of its stdout."""
        async with self._semaphore():
            return await self._run(command, cap, self.path if path is None else path)

    async def _run(self, command: str, cap: int, path: str) -> ActionResult:
        self._reap_orphans()
        start = self._clock()
        if "\x00" in command:
            return ActionResult(None, b"", 0, b"", 0.0, spawn_error="NUL character in command")
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            pid = await self._spawn(command, path, out_w, err_w)
        except (OSError, ValueError) as err:
            os.close(out_r)
            os.close(err_r)
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            return ActionResult(None, b"", 0, b"", 0.0, spawn_error=reason)
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        loop = asyncio.get_running_loop()
        proc = _Proc(self, pid, out_r, err_r, cap)
        self._running.add(proc)
        status: int | None = None
        loop.add_reader(out_r, proc.on_readable, out_r)
        loop.add_reader(err_r, proc.on_readable, err_r)
        timer = loop.call_later(self.timeout, proc.on_timeout)
        try:
            await proc.future
            status = self._status.pop(pid, None)
        except asyncio.CancelledError:
            # The daemon is stopping: the child must not outlive the cycle.
            proc.cancelled = True
            proc.kill()
            if not self._reap(proc):
                self._unreaped.add(pid)
            self._status.pop(pid, None)
            raise
        finally:
            timer.cancel()
            proc.cleanup()
            self._running.discard(proc)
        return ActionResult(
            returncode=status,
            stdout=b"".join(proc.out)[:cap],
            stdout_size=proc.out_len,
            stderr=b"".join(proc.err)[: self.stderr_cap],
            duration=self._clock() - start,
            timed_out=proc.timed_out,
            overflow=proc.overflow,
            cancelled=proc.cancelled,
        )

    async def _spawn(self, command: str, path: str, out_w: int, err_w: int) -> int:
        """Start ``sh -c COMMAND``; closes the write ends of the pipes in every case."""
        libc = self._libc_spawner()
        if libc is None:
            try:
                return os.posix_spawn(
                    self.shell,
                    ["sh", "-c", command],
                    self._env(path),
                    file_actions=[
                        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                        (os.POSIX_SPAWN_DUP2, out_w, 1),
                        (os.POSIX_SPAWN_DUP2, err_w, 2),
                    ],
                    setsid=True,
                    setsigdef=_DEFAULT_SIGNALS,
                    setsigmask=(),
                )
            finally:
                os.close(out_w)
                os.close(err_w)
        job = _SpawnJob(self, out_w, err_w)
        fut = asyncio.get_running_loop().run_in_executor(
            self._executor(),
            job.run,
            libc,
            os.fsencode(self.shell),
            os.fsencode(command),
            self._envp(path),
        )
        try:
            # No shield needed: a cancelled wait leaves the thread running and
            # the job object decides who cleans up.
            pid = await fut
        except asyncio.CancelledError:
            job.abandon()
            raise
        except BaseException:
            job.release()
            raise
        job.release()
        return pid

    def _kill_abandoned(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        self._unreaped.add(pid)  # reaped by the next run or close()

    def _libc_spawner(self) -> _LibcSpawner | None:
        if not self._libc_loaded:
            self._libc_loaded = True
            self._libc = _LibcSpawner.load() if self.spawn_threads > 0 else None
        return self._libc

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.spawn_threads, thread_name_prefix="vhostmd-spawn"
            )
        return self._pool

    def _envp(self, path: str) -> ctypes.Array[ctypes.c_char_p]:
        envp = self._envps.get(path)
        if envp is None:
            items = [os.fsencode(f"{k}={v}") for k, v in self._env(path).items()]
            envp = (ctypes.c_char_p * (len(items) + 1))(*items, None)
            self._envps[path] = envp
        return envp

    def _reap(self, proc: _Proc) -> bool:
        """Collect the child's exit status if it has exited; True when reaped."""
        try:
            pid, raw = os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:
            return True  # reaped elsewhere; status unknown
        if pid == 0:
            return False
        self._status[proc.pid] = os.waitstatus_to_exitcode(raw)
        return True

    def _reap_orphans(self) -> None:
        # Children killed on cancellation that had not died yet: reap them now
        # so they do not stay zombies.
        for pid in list(self._unreaped):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._unreaped.discard(pid)

    def cancel_all(self) -> None:
        """Kill every running action now (their metrics fail as cancelled); call on the loop."""
        for proc in list(self._running):
            proc.cancelled = True
            proc.kill()

    def close(self) -> None:
        """Kill running actions and reap what was left (blocking briefly)."""
        self.cancel_all()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        deadline = time.monotonic() + 2.0
        while self._unreaped and time.monotonic() < deadline:
            self._reap_orphans()
            if self._unreaped:
                time.sleep(0.01)
