"""Alarms with XenServer perfmon's semantics, and where an alarm goes.

A variable (``monitor_config.VariableConfig``) watches one object (the host,
or one VM): every cycle its ``rrd_regex`` selects data sources of that object
(names: ``vhostmd_py.monitors.inputs``), ``consolidation_fn`` folds them into one
value, and the value is "bad" when above (sense high) or below (sense low)
``alarm_trigger_level``.

Timing, as perfmon's trigger_down_counter: a sample stands for the interval
since the object's previous sample (the update period for the first one). The
intervals of consecutive bad samples add up; when they reach
``alarm_trigger_period`` an alarm is generated and the count starts again from
zero. A good sample, or a cycle where no data source matched (no value), also
starts it again. An alarm generated less than ``alarm_auto_inhibit_period``
seconds after the variable's previous one is suppressed (perfmon's
auto-inhibit), the count still restarts. A variable is *active* from its alarm
until its level is good again.

On reload (``AlarmEngine.reconfigure``), a variable whose resolved config is
unchanged keeps its state (count, last alarm, active); a changed one starts
afresh; a removed one is dropped.

An alarm goes to (``AlarmSink``): the log as one line of key=value pairs; the
systemd journal as native fields when its socket exists; an optional hook
command (argv, no shell; the alarm in VHOSTMD_ALARM_* variables; killed after
``hook_timeout``); the state file ``alarms.json`` read by ``vhostmdctl
alarms`` (bounded history plus active alarms); and, opt-in, the VM's own
metrics (``AlarmActive``, ``AlarmActiveVariables``).
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

from vhostmd_py.config import AlarmsConfig, VariableConfig
from vhostmd_py.cycle.render import ExtraMetric
from vhostmd_py.errors import StateFileError, StrPath
from vhostmd_py.fs import read_json, write_json_atomic
from vhostmd_py.monitors.inputs import HOST, Observation

log = logging.getLogger(__name__)

ALARMS_FILE = "alarms.json"
STATE_VERSION = 1
# Rounding slack when intervals (floats) add up to the trigger period.
_EPSILON = 1e-6
# Hooks waiting to run; beyond this an alarm storm drops hook runs (logged),
# never the daemon's memory.
HOOK_QUEUE = 64
# A hook's output kept for the log.
HOOK_OUTPUT = 2000

# Guest metrics (opt-in, <alarms guest_metrics="yes">), for that VM only.
GUEST_ALARM_ACTIVE = "AlarmActive"  # uint32: number of active alarms of this VM
GUEST_ALARM_VARIABLES = "AlarmActiveVariables"  # string: their names, comma separated


# One metric for a VM's own metrics block (render.append_metrics adds it).
GuestMetric = ExtraMetric


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


def consolidate(fn: str, values: Sequence[float]) -> float | None:
    """perfmon's consolidation functions; None when nothing matched."""
    if not values:
        return None
    if fn == "sum":
        return float(sum(values))
    if fn == "average":
        return float(sum(values)) / len(values)
    if fn == "max":
        return max(values)
    return min(values)


class VariableState:
    """One variable of one object: its config and its trigger state."""

    def __init__(self, config: VariableConfig) -> None:
        self.config = config
        self._regex = re.compile(config.rrd_regex)
        self.value: float | None = None
        self.bad_for = 0.0  # seconds of consecutive bad samples
        self.last_time: float | None = None
        self.last_alarm: float | None = None
        self.active = False

    def select(self, values: Mapping[str, float]) -> float | None:
        """The consolidated value of the data sources the regex selects."""
        picked = [v for k, v in sorted(values.items()) if self._regex.search(k)]
        return consolidate(self.config.consolidation_fn, picked)

    def is_bad(self, value: float) -> bool:
        """Whether VALUE is on the wrong side of the level (strictly, as perfmon)."""
        if self.config.alarm_trigger_sense == "high":
            return value > self.config.alarm_trigger_level
        return value < self.config.alarm_trigger_level

    def update(self, value: float | None, now: float, first_step: float) -> Tuple[bool, bool]:
        """Feed one sample; (alarm due, active cleared)."""
        step = first_step if self.last_time is None else max(0.0, now - self.last_time)
        self.last_time = now
        self.value = value
        if value is None or not self.is_bad(value):
            self.bad_for = 0.0
            cleared = self.active and value is not None
            if cleared:
                self.active = False
            return False, cleared
        self.bad_for += step
        if self.bad_for + _EPSILON < self.config.alarm_trigger_period:
            return False, False
        self.bad_for = 0.0  # perfmon resets the counter, alarm sent or inhibited
        if (
            self.last_alarm is not None
            and now - self.last_alarm < self.config.alarm_auto_inhibit_period
        ):
            log.debug("alarm %s inhibited until %.0f", self.config.name,
                      self.last_alarm + self.config.alarm_auto_inhibit_period)
            return False, False
        self.last_alarm = now
        self.active = True
        return True, False


@dataclass
class _Object:
    kind: str
    uuid: str
    name: str
    variables: Dict[str, VariableState]


def _key(kind: str, uuid: str) -> str:
    return "host" if kind == HOST else f"vm:{uuid.lower()}"


class AlarmEngine:
    """Every watched variable of the host and the VMs; fed once per cycle."""

    def __init__(
        self, config: AlarmsConfig, sink: AlarmSink, *, first_step: float
    ) -> None:
        self.config = config
        self.sink = sink
        # The interval a first sample stands for: the daemon's update period.
        self.first_step = first_step
        self._objects: Dict[str, _Object] = {}

    def _wanted(self, kind: str, uuid: str, name: str) -> Tuple[VariableConfig, ...]:
        if kind == HOST:
            return self.config.host
        return self.config.variables_for_vm(uuid, name)

    def _object(self, obs: Observation) -> _Object:
        key = _key(obs.kind, obs.uuid)
        obj = self._objects.get(key)
        if obj is None or obj.name != obs.name:
            # A VM renamed while running can match another override: re-resolve.
            old = obj.variables if obj is not None else {}
            obj = _Object(obs.kind, obs.uuid, obs.name, {})
            for cfg in self._wanted(obs.kind, obs.uuid, obs.name):
                kept = old.get(cfg.name)
                obj.variables[cfg.name] = (
                    kept if kept is not None and kept.config == cfg else VariableState(cfg)
                )
            self._objects[key] = obj
        return obj

    def update(self, observations: Sequence[Observation]) -> List[Alarm]:
        """One cycle: update every variable, emit the alarms due; VMs not seen are dropped."""
        seen = set()
        alarms: List[Alarm] = []
        changed = False
        for obs in observations:
            obj = self._object(obs)
            seen.add(_key(obs.kind, obs.uuid))
            for state in obj.variables.values():
                value = state.select(obs.values)
                due, cleared = state.update(value, obs.time, self.first_step)
                if cleared:
                    changed = True
                    log.info(
                        "alarm cleared: object=%s uuid=%s name=%s variable=%s value=%r",
                        obj.kind, obj.uuid, _quote(obj.name), state.config.name, value,
                    )
                if due and value is not None:
                    alarms.append(self._alarm(obj, state, value, obs.time))
        for key in [k for k in self._objects if k not in seen]:
            gone = self._objects.pop(key)
            changed = changed or any(s.active for s in gone.variables.values())
        for alarm in alarms:
            self.sink.emit(alarm)
        if alarms or changed:
            self.sink.save(self.active())
        return alarms

    @staticmethod
    def _alarm(obj: _Object, state: VariableState, value: float, now: float) -> Alarm:
        cfg = state.config
        sense = "above" if cfg.alarm_trigger_sense == "high" else "below"
        who = "host" if obj.kind == HOST else f"VM {obj.name} ({obj.uuid})"
        message = (
            f"{who}: {cfg.name} = {value:g} {sense} {cfg.alarm_trigger_level:g} "
            f"for {cfg.alarm_trigger_period} s"
        )
        return Alarm(
            time=now,
            object=obj.kind,
            uuid=obj.uuid,
            name=obj.name,
            variable=cfg.name,
            value=value,
            level=cfg.alarm_trigger_level,
            sense=cfg.alarm_trigger_sense,
            period=cfg.alarm_trigger_period,
            priority=cfg.alarm_priority,
            message=message,
        )

    def reconfigure(self, config: AlarmsConfig) -> None:
        """New config (SIGHUP): unchanged variables keep their state, others start afresh."""
        self.config = config
        for obj in self._objects.values():
            old = obj.variables
            obj.variables = {}
            for cfg in self._wanted(obj.kind, obj.uuid, obj.name):
                kept = old.get(cfg.name)
                obj.variables[cfg.name] = (
                    kept if kept is not None and kept.config == cfg else VariableState(cfg)
                )
        self.sink.reconfigure(config)
        self.sink.save(self.active())

    def state(self, kind: str, uuid: str, variable: str) -> VariableState | None:
        """The state of one variable (for inspection and tests)."""
        obj = self._objects.get(_key(kind, uuid))
        return obj.variables.get(variable) if obj is not None else None

    def active(self) -> List[Dict[str, object]]:
        """The active alarms, as JSON-ready records."""
        out: List[Dict[str, object]] = []
        for obj in self._objects.values():
            for st in obj.variables.values():
                if st.active:
                    out.append(
                        {
                            "object": obj.kind,
                            "uuid": obj.uuid,
                            "name": obj.name,
                            "variable": st.config.name,
                            "value": st.value,
                            "since": st.last_alarm,
                            "priority": st.config.alarm_priority,
                        }
                    )
        return out

    def guest_metrics(self, uuid: str) -> List[GuestMetric]:
        """The alarm metrics of one VM (only when the config opts in)."""
        if not self.config.guest_metrics:
            return []
        obj = self._objects.get(_key("vm", uuid))
        names = sorted(s.config.name for s in obj.variables.values() if s.active) if obj else []
        return [
            GuestMetric(GUEST_ALARM_ACTIVE, "uint32", None, str(len(names))),
            GuestMetric(GUEST_ALARM_VARIABLES, "string", None, ",".join(names)),
        ]


# --- where alarms go -------------------------------------------------------------


def _quote(text: str) -> str:
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
            " ".join(f"{k.lower()}={_quote(v)}" for k, v in fields.items() if k != "MESSAGE"),
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
