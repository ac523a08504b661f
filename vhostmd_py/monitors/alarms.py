"""Alarms with XenServer perfmon's semantics: when a variable raises one.

A variable (``config.records.VariableConfig``) watches one object (the host,
or one VM): every cycle its ``rrd_regex`` selects data sources of that object
(names: ``vhostmd_py.monitors.inputs``), ``consolidation_fn`` folds them into
one value, and the value is "bad" when above (sense high) or below (sense low)
``alarm_trigger_level``, strictly.

Timing is perfmon's ``Variable.update``, sample by sample: a counter starts
at ``alarm_trigger_period``; each bad sample subtracts one fixed step, the
daemon's update period (perfmon's rrd_step: the time one sample stands for,
whatever the measured gap between cycles), and when it reaches 0 or less an
alarm is due and the counter starts again from the full period. A good
sample, or one without a value, resets it. So an alarm comes on the
ceil(period / step)-th consecutive bad sample, and the same sample sequence
always gives the same alarms. An alarm due less than
``alarm_auto_inhibit_period`` seconds (wall clock of the cycles) after the
variable's previous one is suppressed (perfmon's auto-inhibit); the counter
restarts all the same. A variable is *active* from its alarm until its level
is good again.

Values, by the variable's dialect (where it was configured): our own
``<alarm>`` format consolidates the known values the regex selects and has
no value when it selects none; perfmon's ``<config>`` format is perfmon's
own arithmetic: ``sum`` of nothing is 0, a selected source whose value is
unknown this cycle makes the result unknown (perfmon's NaN: never bad), and
``get_percent_fs_usage`` ignores the sources and takes the cycle's
filesystem usage (a fraction). perfmon's ``average`` or ``max`` of nothing
would raise; here they give no value.

On reload (``AlarmEngine.reconfigure``), a variable whose resolved config is
unchanged keeps its state (counter, last alarm, active); a changed one starts
afresh; a removed one is dropped. Delivery is sinks.py's.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

from vhostmd_py.config.records import PERFMON, AlarmsConfig, VariableConfig
from vhostmd_py.cycle.render import ExtraMetric
from vhostmd_py.monitors.inputs import HOST, Observation
from vhostmd_py.monitors.sinks import (
    ALARMS_FILE,
    Alarm,
    AlarmSink,
    HookRunner,
    journal_payload,
    quote,
    run_hook,
)

log = logging.getLogger(__name__)

__all__ = [
    "ALARMS_FILE",
    "Alarm",
    "AlarmEngine",
    "AlarmSink",
    "GuestMetric",
    "HookRunner",
    "VariableState",
    "consolidate",
    "journal_payload",
    "run_hook",
]

# Guest metrics (opt-in, <alarms guest_metrics="yes">), for that VM only.
GUEST_ALARM_ACTIVE = "AlarmActive"  # uint32: number of active alarms of this VM
GUEST_ALARM_VARIABLES = "AlarmActiveVariables"  # string: their names, comma separated


# One metric for a VM's own metrics block (render.append_metrics adds it).
GuestMetric = ExtraMetric


def consolidate(
    fn: str, values: Sequence[float], *, dialect: str = "", fs_usage: float | None = None
) -> float | None:
    """One value from the selected sources' values (see the module docstring)."""
    if dialect == PERFMON:
        if fn == "get_percent_fs_usage":
            return fs_usage
        if fn == "sum":
            return float(sum(values))  # sum([]) is 0; a NaN stays NaN
        if not values:
            return None
    else:
        values = [v for v in values if not math.isnan(v)]
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
        # perfmon's trigger_down_counter: seconds still to go before an alarm.
        self.counter = float(config.alarm_trigger_period)
        self.last_alarm: float | None = None
        self.active = False

    def select(self, values: Mapping[str, float], fs_usage: float | None = None) -> float | None:
        """The consolidated value of the data sources the regex selects."""
        picked = [v for k, v in sorted(values.items()) if self._regex.search(k)]
        return consolidate(
            self.config.consolidation_fn, picked, dialect=self.config.dialect, fs_usage=fs_usage
        )

    def is_bad(self, value: float) -> bool:
        """Whether VALUE is on the wrong side of the level (strictly, as perfmon; NaN never)."""
        if self.config.alarm_trigger_sense == "high":
            return value > self.config.alarm_trigger_level
        return value < self.config.alarm_trigger_level

    def update(self, value: float | None, now: float, step: float) -> Tuple[bool, bool]:
        """Feed one sample standing for STEP seconds; (alarm due, active cleared)."""
        self.value = value
        if value is None or not self.is_bad(value):
            self.counter = float(self.config.alarm_trigger_period)
            cleared = self.active and value is not None and not math.isnan(value)
            if cleared:
                self.active = False
            return False, cleared
        self.counter -= step
        if self.counter > 0:
            return False, False
        # perfmon resets the counter whether the alarm is sent or inhibited.
        self.counter = float(self.config.alarm_trigger_period)
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
    extra: Tuple[VariableConfig, ...] = ()  # its own variables (domain metadata) in force


def _key(kind: str, uuid: str) -> str:
    return "host" if kind == HOST else f"vm:{uuid.lower()}"


class AlarmEngine:
    """Every watched variable of the host and the VMs; fed once per cycle."""

    def __init__(
        self, config: AlarmsConfig, sink: AlarmSink, *, step: float,
        vm_variables: Callable[[str], Tuple[VariableConfig, ...]] | None = None,
    ) -> None:
        """VM_VARIABLES: a VM's own variables by UUID (perfmon's <config> in its
        domain metadata): they join the config's, replacing those of the same name."""
        self.config = config
        self.sink = sink
        self._vm_variables = vm_variables
        # The time one sample stands for: the daemon's update period.
        self.step = step
        self._objects: Dict[str, _Object] = {}

    def _own(self, kind: str, uuid: str) -> Tuple[VariableConfig, ...]:
        if kind == HOST or self._vm_variables is None:
            return ()
        return self._vm_variables(uuid)

    def _wanted(self, kind: str, uuid: str, name: str) -> Tuple[VariableConfig, ...]:
        if kind == HOST:
            return self.config.host
        own = self._own(kind, uuid)
        base = self.config.variables_for_vm(uuid, name)
        if not own:
            return base
        names = {v.name for v in own}
        return tuple(v for v in base if v.name not in names) + own

    def _object(self, obs: Observation) -> _Object:
        key = _key(obs.kind, obs.uuid)
        obj = self._objects.get(key)
        own = self._own(obs.kind, obs.uuid)
        if obj is None or obj.name != obs.name or obj.extra != own:
            # A VM renamed while running can match another override: re-resolve.
            old = obj.variables if obj is not None else {}
            obj = _Object(obs.kind, obs.uuid, obs.name, {}, own)
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
                value = state.select(obs.values, obs.fs_usage)
                due, cleared = state.update(value, obs.time, self.step)
                if cleared:
                    changed = True
                    log.info(
                        "alarm cleared: object=%s uuid=%s name=%s variable=%s value=%r",
                        obj.kind, obj.uuid, quote(obj.name), state.config.name, value,
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
            obj.extra = self._own(obj.kind, obj.uuid)
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


