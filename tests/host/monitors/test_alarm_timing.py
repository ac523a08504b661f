"""Alarm timing against perfmon's rule, stated here on its own (the oracle), sample by sample.

perfmon's ``Variable.update``: a counter starts at the trigger period; a bad
sample subtracts one fixed step (rrd_step, here the update period) and at 0
or below an alarm is due (sent unless within the auto-inhibit period of the
previous one, wall clock) and the counter is set back to the period; a good
sample sets it back too. The engine must give the same alarm sample numbers
whatever the jitter of the cycles' times.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import pytest
from helpers.perfmon import LEVEL, oracle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostmd_py.config.records import AlarmsConfig, VariableConfig
from vhostmd_py.monitors.alarms import AlarmEngine, AlarmSink
from vhostmd_py.monitors.inputs import VM, Observation

UUID = "00000000-0000-4000-8000-0000000000aa"


def _with_vm(tmp: Path, var: VariableConfig) -> AlarmsConfig:
    from vhostmd_py.config.records import PartialVariable

    fields = tuple(
        (k, str(getattr(var, k)))
        for k in ("rrd_regex", "consolidation_fn", "alarm_trigger_level", "alarm_trigger_sense",
                  "alarm_trigger_period", "alarm_auto_inhibit_period", "alarm_priority")
    )
    partial = PartialVariable(var.name, fields, True, "test", None)
    return AlarmsConfig(
        state_dir=str(tmp), hook=None, hook_timeout=1.0, history=10_000,
        journal_socket=str(tmp / "no-journal"), guest_metrics=False, host=(),
        vm=(partial,), overrides=(),
    )


def engine_alarms(
    tmp: Path,
    values: Sequence[float],
    times: Sequence[float],
    *,
    sense: str,
    period: int,
    step: int,
    inhibit: int,
) -> List[int]:
    """The 1-based samples at which the real engine (real sink, state file) alarms."""
    config = _with_vm(tmp, VariableConfig(
        name="cpu_usage", rrd_regex="^cpu_usage$", consolidation_fn="average",
        alarm_trigger_level=LEVEL, alarm_trigger_sense=sense, alarm_trigger_period=period,
        alarm_auto_inhibit_period=inhibit, alarm_priority=5,
    ))
    sink = AlarmSink(config, state_dir=tmp)
    engine = AlarmEngine(config, sink, step=step)
    out = []
    for number, (value, now) in enumerate(zip(values, times), start=1):
        obs = Observation(VM, UUID, "vm1", now, {"cpu_usage": value})
        if engine.update([obs]):
            out.append(number)
    sink.close()
    return out


GOOD, BAD_HIGH = 10.0, 90.0


@st.composite
def scenario(draw: st.DrawFn) -> tuple:
    step = draw(st.integers(1, 10))
    period = draw(st.integers(1, 12)) * draw(st.sampled_from([1, step]))
    sense = draw(st.sampled_from(["high", "low"]))
    bad, good = (BAD_HIGH, GOOD) if sense == "high" else (GOOD, BAD_HIGH)
    runs = draw(st.lists(st.tuples(st.booleans(), st.integers(1, 3 * max(1, period // step) + 2)),
                         min_size=1, max_size=12))
    values = [bad if is_bad else good for is_bad, length in runs for _ in range(length)]
    inhibit = draw(st.sampled_from([0, step * 3 + step // 2, 10_000]))
    # Cycles jitter: each gap is the step +/- 10 %.
    gaps = draw(st.lists(st.floats(0.9, 1.1), min_size=len(values), max_size=len(values)))
    times, now = [], 1_000_000.0
    for gap in gaps:
        now += gap * step
        times.append(now)
    return values, times, sense, period, step, inhibit


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario())
def test_engine_matches_perfmons_rule(
    tmp_path_factory: pytest.TempPathFactory, case: tuple
) -> None:
    """Generated bad/good runs with jittered cycle times: the engine's alarms are perfmon's."""
    values, times, sense, period, step, inhibit = case
    tmp = tmp_path_factory.mktemp("alarms")
    kw = dict(sense=sense, period=period, step=step, inhibit=inhibit)
    assert engine_alarms(tmp, values, times, **kw) == oracle(values, times, **kw)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=80), st.integers(1, 20),
       st.lists(st.floats(0.5, 1.5), min_size=80, max_size=80),
       st.lists(st.floats(0.5, 1.5), min_size=80, max_size=80))
def test_same_samples_same_alarms_whatever_the_timing(
    tmp_path_factory: pytest.TempPathFactory, bad: List[bool], period: int,
    gaps_a: List[float], gaps_b: List[float],
) -> None:
    """Two runs of one sample sequence with different cycle gaps give the same alarms."""
    values = [BAD_HIGH if b else GOOD for b in bad]

    def run(gaps: List[float]) -> List[int]:
        times = [1000.0 + sum(gaps[: i + 1]) for i in range(len(values))]
        return engine_alarms(tmp_path_factory.mktemp("run"), values, times, sense="high",
                             period=period, step=1, inhibit=0)

    assert run(gaps_a) == run(gaps_b) == oracle(values, [0.0] * len(values), sense="high",
                                                period=period, step=1, inhibit=0)


def test_exact_short_interrupted_and_inhibited(tmp_path: Path) -> None:
    """Period 5 at step 1, cycles 0.9-1.1 s apart: the documented sample numbers."""
    b, g = BAD_HIGH, GOOD
    values = (
        [g] + [b] * 5 + [g]             # exactly the trigger length: alarm at sample 6
        + [b] * 4 + [g]                 # one short: none
        + [b] * 3 + [g] + [b] * 5       # interrupted, then again in full: alarm at sample 21
        + [g]
    )
    times = [1000.0 + i + (0.1 if i % 2 else -0.1) for i in range(len(values))]
    kw = dict(sense="high", period=5, step=1, inhibit=0)
    assert engine_alarms(tmp_path / "a", values, times, **kw) == [6, 21]
    # Bad throughout, inhibit 12 s: due every 5 samples, sent at 1, 3rd (15 s later), ...
    long = [b] * 40
    times = [1000.0 + i * 1.05 for i in range(40)]
    kw = dict(sense="high", period=5, step=1, inhibit=12)
    assert engine_alarms(tmp_path / "b", long, times, **kw) == [5, 20, 35]
    assert oracle(long, times, **kw) == [5, 20, 35]
    # The accumulated-seconds rule this replaces alarmed one sample late at 0.98 s gaps.
    times = [1000.0 + i * 0.98 for i in range(40)]
    kw = dict(sense="high", period=5, step=1, inhibit=0)
    assert engine_alarms(tmp_path / "c", long, times, **kw)[:2] == [5, 10]
