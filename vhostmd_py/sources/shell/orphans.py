"""What actions leave running: the daemon adopts, bounds and ends it.

Upstream runs each action with popen(); whatever the action starts in the
background outlives it, and what calls setsid() or double-forks leaves even
our process group, so a killpg() at the timeout misses it: an action starting
50 such children every cycle left 1,600 processes after 32 cycles.

The daemon becomes a child subreaper (``PR_SET_CHILD_SUBREAPER``, through the runner's
binding: vhostmd_py.sources.shell.binding): when an action's shell exits, what
it left is reparented to us instead of init. After each cycle ``sweep()``
lists our children; one that is not a worker shell of a running batch and is
not in our own session (libvirt's own helpers, an ``ssh`` for a remote URI,
stay in ours) is an action's orphan. Policy:

- a dead one is reaped (we are its parent now: nobody else will);
- a live one may go on (upstream lets `refresh-cache &` in an action finish)
  for at most ``max_age`` seconds (the daemon passes the action timeout: an
  orphan lives no longer than an action could), and at most ``limit`` of
  them at once (ORPHAN_LIMIT): past either bound it is killed with its
  process group (unless that group is a running worker's: then alone);
- every one is killed when the daemon stops (``end_all``).

A process is acted on only once it was an orphan in an earlier sweep as
well (same pid and start time): a worker shell spawned microseconds ago may
not be in ``worker_pids()`` yet, and must never be mistaken for an orphan.
So at most ``limit`` plus one cycle's new orphans are alive at any time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import Callable, Collection, Dict, List, Tuple

log = logging.getLogger(__name__)

ORPHAN_LIMIT = 64
# At most one warning per this many seconds about killed orphans (an action
# that leaves children every cycle would log every cycle); the rest is debug.
LOG_EVERY = 60.0
# end_all(): how long the daemon's stop may spend ending orphans (docs/COMPATIBILITY.md,
# Daemon: the whole stop within 2 s).
END_ALL_BUDGET = 0.5

Ident = Tuple[int, int]  # pid, start time (clock ticks since boot): survives pid reuse


class _Proc:
    __slots__ = ("ident", "pgid", "pid", "ppid", "session", "zombie")

    def __init__(
        self, pid: int, zombie: bool, ppid: int, pgid: int, session: int, start: int
    ) -> None:
        self.pid = pid
        self.ppid = ppid
        self.zombie = zombie
        self.pgid = pgid
        self.session = session
        self.ident: Ident = (pid, start)


def enable_subreaper() -> bool:
    """Make this process the reaper of its descendants' orphans; False (logged) if refused."""
    # The runner's binding (it loads the compiled _runner): only the daemon calls this.
    from vhostmd_py.sources.shell import binding

    try:
        binding.set_child_subreaper(True)
    except OSError as err:
        log.warning(
            "cannot become the reaper of actions' orphans (%s): what actions leave running "
            "outside their process group is not ended",
            err.strerror,
        )
        return False
    return True


class OrphanReaper:
    """Reaps and bounds the orphans of actions (see the module docstring)."""

    def __init__(
        self,
        *,
        max_age: float,
        limit: int = ORPHAN_LIMIT,
        clock: Callable[[], float] = time.monotonic,
        proc: str = "/proc",
    ) -> None:
        if limit < 0 or max_age < 0:
            raise ValueError("limit and max_age must not be negative")
        self.limit = limit
        self.max_age = max_age
        self._clock = clock
        self._proc = proc
        self._seen: Dict[Ident, float] = {}  # orphan -> when first seen
        self._last_log = -LOG_EVERY
        self.killed = 0  # total, for tests and the log

    # --- /proc --------------------------------------------------------------

    def _children(self) -> List[int]:
        """Our children's pids: /proc/self/task/*/children (CONFIG_PROC_CHILDREN),
        else a scan of every /proc/PID/stat for our pid as parent."""
        me = os.getpid()
        base = f"{self._proc}/{me}/task"
        pids: List[int] = []
        try:
            tasks = os.listdir(base)
            for tid in tasks:
                with open(f"{base}/{tid}/children", "rb") as fh:
                    pids.extend(int(p) for p in fh.read().split())
            return pids
        except OSError:
            pass
        try:
            entries = os.listdir(self._proc)
        except OSError as err:  # no /proc (a sandbox): no orphan can be told apart
            log.debug("cannot list %s: %s", self._proc, err)
            return []
        for entry in entries:
            if entry.isdigit():
                proc = self._stat(int(entry))
                if proc is not None and proc.ppid == me:
                    pids.append(proc.pid)
        return pids

    def _stat(self, pid: int) -> _Proc | None:
        try:
            with open(f"{self._proc}/{pid}/stat", "rb") as fh:
                raw = fh.read()
        except OSError:
            return None
        # comm may hold ")" and blanks: the fields follow the LAST ")".
        fields = raw[raw.rindex(b")") + 2 :].split()
        return _Proc(pid, fields[0] == b"Z", int(fields[1]), int(fields[2]), int(fields[3]),
                     int(fields[19]))

    def _orphans(self, workers: Collection[int]) -> List[_Proc]:
        ours = os.getsid(0)
        found = []
        for pid in self._children():
            if pid in workers:
                continue
            proc = self._stat(pid)
            if proc is not None and proc.session != ours:
                found.append(proc)
        return found

    # --- policy -------------------------------------------------------------

    def sweep(self, workers: Collection[int]) -> int:
        """Reap dead orphans, end those past the bounds; WORKERS: the runner's worker_pids().
        Returns how many were killed."""
        now = self._clock()
        orphans = self._orphans(workers)
        seen = {p.ident: self._seen.get(p.ident, now) for p in orphans}
        known = [p for p in orphans if p.ident in self._seen]
        self._seen = seen
        for proc in known:
            if proc.zombie:
                self._reap(proc.pid)
        live = [p for p in orphans if not p.zombie]
        old = [p for p in known if not p.zombie and now - seen[p.ident] >= self.max_age]
        doomed = {p.ident: p for p in old}
        excess = len(live) - len(doomed) - self.limit
        if excess > 0:
            # The newest first: those that were there first keep running.
            spare = sorted((p for p in known if not p.zombie and p.ident not in doomed),
                           key=lambda p: p.ident[1], reverse=True)
            for proc in spare[:excess]:
                doomed[proc.ident] = proc
        if not doomed:
            return 0
        for proc in doomed.values():
            self._kill(proc, workers)
        self.killed += len(doomed)
        level = logging.WARNING if now - self._last_log >= LOG_EVERY else logging.DEBUG
        if level == logging.WARNING:
            self._last_log = now
        log.log(
            level,
            "killed %d process(es) left behind by actions (%d running, at most %d may, "
            "each for at most %.0f s); %d killed so far",
            len(doomed), len(live), self.limit, self.max_age, self.killed,
        )
        return len(doomed)

    def end_all(self, workers: Collection[int] = (), budget: float = END_ALL_BUDGET) -> int:
        """The daemon stops (its runner closed, WORKERS normally empty): kill and reap every
        orphan, and what killing them orphans in turn, for at most BUDGET seconds."""
        deadline = time.monotonic() + budget
        killed = 0
        while True:
            orphans = self._orphans(workers)
            if not orphans:
                break
            for proc in orphans:
                if proc.zombie:
                    self._reap(proc.pid)
                else:
                    self._kill(proc, workers)
                    killed += 1
            if time.monotonic() >= deadline:
                log.warning("%d process(es) left by actions could not be ended", len(orphans))
                break
            time.sleep(0.005)
        self._seen.clear()
        if killed:
            log.info("killed %d process(es) left behind by actions", killed)
        self.killed += killed
        return killed

    @staticmethod
    def _kill(proc: _Proc, workers: Collection[int]) -> None:
        # Its whole group (what it started in turn), unless that group is a
        # running worker's (an action still running there) or ours.
        group = proc.pgid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group > 1 and group not in workers and group != os.getpgid(0):
                os.killpg(group, signal.SIGKILL)
            else:
                os.kill(proc.pid, signal.SIGKILL)

    @staticmethod
    def _reap(pid: int) -> None:
        # By pid, never -1: the runner's C code waits for its own workers.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
