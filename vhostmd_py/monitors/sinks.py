"""Where an alarm goes (``AlarmSink``), and the alarm record itself.

An alarm goes to: the log as one line of key=value pairs; the systemd journal
as native fields when its socket exists; an optional hook command (argv, no
shell; the alarm in VHOSTMD_ALARM_* variables; killed after ``hook_timeout``);
the state file ``alarms.json`` read by ``vhostmdctl alarms`` (bounded history
plus active alarms). The engine (alarms.py) decides when; this module only
delivers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

from vhostmd_py.config.records import AlarmsConfig
from vhostmd_py.errors import StateFileError, StrPath
from vhostmd_py.fs import read_json, write_json_atomic

log = logging.getLogger(__name__)

ALARMS_FILE = "alarms.json"
STATE_VERSION = 1
# Hooks waiting to run; beyond this an alarm storm drops hook runs (logged),
# never the daemon's memory.
HOOK_QUEUE = 64
# A hook's output kept for the log.
HOOK_OUTPUT = 2000


@dataclass(frozen=True)
class Alarm:
    """One generated alarm."""

    time: float  # wall clock, seconds since the epoch
    object: str  # "host" | "vm"
    uuid: str  # "" for the host
    name: str  # VM or host name
    variable: str
    value: float
    level: float
    sense: str
    period: int  # the trigger period it was bad for
    priority: int
    message: str

    def fields(self) -> Dict[str, str]:
        """The alarm as flat text fields (log, journal, environment)."""
        return {
            "TIME": f"{self.time:.3f}",
            "OBJECT": self.object,
            "UUID": self.uuid,
            "NAME": self.name,
            "VARIABLE": self.variable,
            "VALUE": repr(self.value),
            "LEVEL": repr(self.level),
            "SENSE": self.sense,
            "PERIOD": str(self.period),
            "PRIORITY": str(self.priority),
            "MESSAGE": self.message,
        }


def quote(text: str) -> str:
    """A value for a key=value log line: bare when safe, else a JSON string."""
    if text and re.fullmatch(r"[A-Za-z0-9._:/@%+-]+", text):
        return text
    return json.dumps(text)


def journal_payload(fields: Mapping[str, str]) -> bytes:
    """systemd's native journal protocol: KEY=value lines, binary form for multi-line values."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalSender:
    """Native journal fields over the journal's AF_UNIX datagram socket, when it exists."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._warned = False

    def send(self, fields: Mapping[str, str]) -> bool:
        """Send one entry; False (logged once) when there is no journal or it refused."""
        if not os.path.exists(self.socket_path):
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(journal_payload(fields), self.socket_path)
        except OSError as err:
            if not self._warned:
                log.warning("cannot send alarms to the journal at %s: %s", self.socket_path, err)
                self._warned = True
            return False
        return True


def hook_environment(alarm: Alarm, path: str) -> Dict[str, str]:
    """The hook's whole environment: PATH and the alarm's VHOSTMD_ALARM_* variables."""
    env = {"PATH": path}
    for key, value in alarm.fields().items():
        env[f"VHOSTMD_ALARM_{key}"] = value
    return env


def run_hook(argv: Sequence[str], env: Mapping[str, str], timeout: float) -> int | None:
    """Run a hook (exec, no shell) in its own session; kill its group after TIMEOUT.

    Returns the exit status, or None when it timed out or could not start.
    """
    try:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed as a whole
            close_fds=True,
        )
    except OSError as err:
        log.error("alarm hook %s cannot start: %s", argv[0], err.strerror or err)
        return None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        # A grandchild that left the group may still hold the pipe: stop reading.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=1.0)
        proc.wait()
        log.error("alarm hook %s killed after %.1f s", argv[0], timeout)
        return None
    if proc.returncode != 0:
        log.warning(
            "alarm hook %s exited with status %d: %s",
            argv[0], proc.returncode, out[:HOOK_OUTPUT].decode("utf-8", "replace").strip(),
        )
    return proc.returncode


class HookRunner:
    """Runs hooks one at a time on a thread, so a slow hook never delays a cycle."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Tuple[Sequence[str], Mapping[str, str], float] | None] = (
            queue.Queue(HOOK_QUEUE)
        )
        self._thread: threading.Thread | None = None
        self.results: List[int | None] = []

    def submit(self, argv: Sequence[str], env: Mapping[str, str], timeout: float) -> None:
        """Queue one hook run (dropped, logged, when too many are waiting)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="vhostmd-hooks", daemon=True)
            self._thread.start()
        try:
            self._queue.put_nowait((argv, env, timeout))
        except queue.Full:
            log.error("alarm hook %s not run: %d runs already waiting", argv[0], HOOK_QUEUE)

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self.results.append(run_hook(*item))
            finally:
                self._queue.task_done()

    def join(self) -> None:
        """Wait until every queued hook has run (tests, shutdown)."""
        if self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        """Let the thread end after the runs already queued."""
        if self._thread is not None:
            self._queue.put(None)


class AlarmSink:
    """Everything an alarm is delivered to; the OS boundaries are parameters."""

    def __init__(
        self,
        config: AlarmsConfig,
        *,
        state_dir: StrPath | None = None,
        journal_socket: str | None = None,
        hook_path: str = "/usr/sbin:/sbin:/usr/bin:/bin",
        hooks: HookRunner | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._state_dir_override = os.fspath(state_dir) if state_dir is not None else None
        self._journal_override = journal_socket
        self.journal = JournalSender(journal_socket or config.journal_socket)
        self.hook_path = hook_path
        self.hooks = hooks if hooks is not None else HookRunner()
        self._clock = clock
        self.recent: List[Dict[str, object]] = self._load_recent()

    @property
    def state_file(self) -> str:
        """Where ``vhostmdctl alarms`` reads the recent and active alarms."""
        return os.path.join(self._state_dir_override or self.config.state_dir, ALARMS_FILE)

    def _load_recent(self) -> List[Dict[str, object]]:
        # The history survives a restart; a damaged file is logged and replaced.
        try:
            data = read_json(self.state_file)
        except StateFileError as err:
            log.warning("%s: starting a new alarm history", err)
            return []
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            return []
        recent = data.get("recent")
        return [r for r in recent if isinstance(r, dict)] if isinstance(recent, list) else []

    def reconfigure(self, config: AlarmsConfig) -> None:
        """Apply a reloaded config (journal socket, hook, history bound)."""
        self.config = config
        self.journal = JournalSender(self._journal_override or config.journal_socket)

    def emit(self, alarm: Alarm) -> None:
        """Deliver one alarm: log line, journal, hook, history."""
        fields = alarm.fields()
        log.warning(
            "ALARM %s",
            " ".join(f"{k.lower()}={quote(v)}" for k, v in fields.items() if k != "MESSAGE"),
        )
        journal = {
            "MESSAGE": f"vhostmd alarm: {alarm.message}",
            # syslog's warning level; perfmon's priority is its own field.
            "PRIORITY": "4",
            "SYSLOG_IDENTIFIER": "vhostmd",
        }
        journal.update({f"VHOSTMD_ALARM_{k}": v for k, v in fields.items()})
        self.journal.send(journal)
        if self.config.hook:
            env = hook_environment(alarm, self.hook_path)
            self.hooks.submit([self.config.hook], env, self.config.hook_timeout)
        self.recent.append(asdict(alarm))
        del self.recent[: max(0, len(self.recent) - self.config.history)]

    def save(self, active: List[Dict[str, object]]) -> None:
        """Write the history and the active alarms atomically (errors are logged)."""
        data = {
            "version": STATE_VERSION,
            "updated": self._clock(),
            "recent": self.recent[-self.config.history :],
            "active": active,
        }
        try:
            write_json_atomic(self.state_file, data)
        except StateFileError as err:
            log.error("%s", err)

    def close(self) -> None:
        """Stop the hook thread after the queued runs."""
        self.hooks.close()
