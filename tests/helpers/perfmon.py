"""perfmon's alarm rule, stated on its own from its Variable.update: the tests' oracle."""

from __future__ import annotations

from typing import List, Sequence

LEVEL = 50.0


def oracle(
    values: Sequence[float],
    times: Sequence[float],
    *,
    sense: str,
    period: int,
    step: int,
    inhibit: int,
) -> List[int]:
    """perfmon's rule, written from its Variable.update: the 1-based samples that alarm."""
    counter = period
    last_alarm = None  # perfmon: created at "now - inhibit", so the first alarm is sent
    out = []
    for number, (value, now) in enumerate(zip(values, times), start=1):
        bad = value > LEVEL if sense == "high" else value < LEVEL
        if not bad:
            counter = period
            continue
        counter -= step
        if counter <= 0:
            if last_alarm is None or now - last_alarm >= inhibit:
                last_alarm = now
                out.append(number)
            counter = period
    return out
