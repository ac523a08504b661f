"""Alarm timing through the real daemon, real time, update_period 1, input driven from outside.

A private libvirtd serves the test driver; the daemon reads the VM's balloon
statistics from it and the test changes the VM's memory (``virsh setmem``:
the test driver's ``unused`` is half the current memory) once per cycle,
right after the daemon logged the cycle before. Two variables watch the same
value: trigger 5 s without inhibit, trigger 3 s with a 7 s inhibit. The alarm
sample numbers are perfmon's (the oracle of test_alarm_timing) and the same
on every run.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Dict, Iterator, List

import libvirt
import pytest
from helpers import libvirtd
from helpers.config import write_config
from helpers.daemon import Vhostmd
from helpers.perfmon import oracle

GOOD_KIB, BAD_KIB = 2_097_152, 1_000_000  # unused = half: 1048576 (good) / 500000 (bad)
LEVEL = 600_000
B, G = True, False
SEQUENCE = (
    [G] + [B] * 5 + [G]          # exactly the trigger length of "exact"
    + [B] * 4 + [G]              # one short
    + [B] * 3 + [G] + [B] * 5    # interrupted, then in full
    + [G] + [B] * 20 + [G]       # bad for long: repeated alarms, across "inhibited"'s inhibit
)
ALARMS = f"""  <alarms state_dir="{{state}}" journal_socket="{{state}}/no-journal">
    <alarm><name>exact</name><rrd_regex>^memory_free_kib$</rrd_regex>
      <alarm_trigger_level>{LEVEL}</alarm_trigger_level><alarm_trigger_sense>low</alarm_trigger_sense>
      <alarm_trigger_period>5</alarm_trigger_period>
      <alarm_auto_inhibit_period>0</alarm_auto_inhibit_period></alarm>
    <alarm><name>inhibited</name><rrd_regex>^memory_free_kib$</rrd_regex>
      <alarm_trigger_level>{LEVEL}</alarm_trigger_level><alarm_trigger_sense>low</alarm_trigger_sense>
      <alarm_trigger_period>3</alarm_trigger_period>
      <alarm_auto_inhibit_period>7</alarm_auto_inhibit_period></alarm>
  </alarms>
"""
UNUSED = """    <metric type="uint64" context="vm" unit="KiB">
      <name>Unused</name><source>vm.balloon.unused</source>
    </metric>
"""
CYCLE = re.compile(r"cycle (\d+):")
ALARM = re.compile(r"ALARM .*variable=(\w+)")


@pytest.fixture
def private_uri() -> Iterator[str]:
    yield from libvirtd.start()


def _drive(uri: str, tmp: Path) -> Dict[str, List[int]]:
    """One daemon run over SEQUENCE; the 1-based sample numbers of each variable's alarms."""
    conn = libvirt.open(uri)
    dom = conn.lookupByName("test")

    def set_sample(number: int) -> None:
        bad = SEQUENCE[min(number, len(SEQUENCE)) - 1]
        dom.setMemory(BAD_KIB if bad else GOOD_KIB)

    state = tmp / "state"
    tmp.mkdir(parents=True, exist_ok=True)
    conf = write_config(tmp / "vhostmd.conf", tmp / "disk", [UNUSED], period=1,
                        after_metrics=ALARMS.format(state=state))
    set_sample(1)
    daemon = Vhostmd(["-d", "-v", "-f", str(conf), "-c", uri], tmp)
    alarms: Dict[str, List[int]] = {"exact": [], "inhibited": []}
    try:
        seen = 0
        deadline = time.monotonic() + len(SEQUENCE) * 3 + 30
        while seen < len(SEQUENCE):
            assert time.monotonic() < deadline, daemon.log()[-3000:]
            assert daemon.proc.poll() is None, daemon.log()[-3000:]
            lines = daemon.log().splitlines()
            # Re-scan the whole log: alarms belong to the cycle logged after them.
            cycle_alarms: List[List[str]] = [[]]
            for line in lines:
                if (m := ALARM.search(line)) is not None:
                    cycle_alarms[-1].append(m.group(1))
                elif (c := CYCLE.search(line)) is not None:
                    assert int(c.group(1)) == len(cycle_alarms), line
                    cycle_alarms.append([])
            done = len(cycle_alarms) - 1
            if done > seen:
                seen = done
                set_sample(seen + 1)
                for number, names in enumerate(cycle_alarms[:-1], start=1):
                    for name in names:
                        if number not in alarms[name]:
                            alarms[name].append(number)
            time.sleep(0.01)
    finally:
        daemon.close()
        dom.setMemory(GOOD_KIB)
        conn.close()
    return {k: sorted(v) for k, v in alarms.items()}


def test_alarm_samples_are_perfmons_and_repeat(private_uri: str, tmp_path: Path) -> None:
    """Exact, one short, interrupted, across an inhibit: the same samples, run after run."""
    values = [0.0 if bad else 1e9 for bad in SEQUENCE]  # the oracle's level is 50
    times = [float(i) for i in range(len(SEQUENCE))]
    want = {
        "exact": oracle(values, times, sense="low", period=5, step=1, inhibit=0),
        "inhibited": oracle(values, times, sense="low", period=3, step=1, inhibit=7),
    }
    assert want == {"exact": [6, 21, 27, 32, 37, 42], "inhibited": [4, 15, 25, 34]}
    runs = [_drive(private_uri, tmp_path / f"run{i}") for i in range(2)]
    print("alarm samples per run:", runs)
    assert runs == [want, want]
