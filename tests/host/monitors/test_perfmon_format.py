"""perfmon's own <config> format: its defaults, units, arithmetic, refusals; its data sources."""

from __future__ import annotations

import logging
import math
import os
import subprocess
from pathlib import Path
from typing import List

import pytest
from helpers.monitor import write_conf

from vhostmd_py.config import load_config
from vhostmd_py.config.perfmon import parse_perfmon_config
from vhostmd_py.config.records import PERFMON, AlarmsConfig, VariableConfig
from vhostmd_py.errors import ConfigError
from vhostmd_py.monitors.alarms import AlarmEngine, AlarmSink, consolidate
from vhostmd_py.monitors.inputs import RateAdapter, fs_usage
from vhostmd_py.sources.stats import CycleStats, HostStats, VmStats

UUID = "00000000-0000-4000-8000-0000000000e1"
# perfmon's own example (VMMonitor's docstring).
EXAMPLE = (b'<config><variable><name value="cpu_usage"/>'
           b'<alarm_trigger_level value="0.5"/></variable></config>')


def test_perfmons_example_and_defaults() -> None:
    """cpu_usage: cpu[0-9]+, average, 60 s, 1 h; fs_usage: 0.9, one week, the fs function."""
    got = parse_perfmon_config(EXAMPLE + b"", where="dom")
    (cpu,) = got.variables
    assert (cpu.rrd_regex, cpu.consolidation_fn, cpu.alarm_trigger_level,
            cpu.alarm_trigger_sense, cpu.alarm_trigger_period, cpu.alarm_auto_inhibit_period,
            cpu.alarm_priority, cpu.dialect) == (
        "cpu[0-9]+", "average", 0.5, "high", 60, 3600, 5, PERFMON)
    fs = parse_perfmon_config(b'<config><variable><name value="fs_usage"/></variable></config>',
                              where="f").variables[0]
    assert (fs.consolidation_fn, fs.alarm_trigger_level, fs.alarm_auto_inhibit_period) == (
        "get_percent_fs_usage", 0.9, 604800)
    host = parse_perfmon_config(
        b'<config><variable><name value="network_usage"/><alarm_trigger_level value="1e6"/>'
        b'<alarm_trigger_sense value="anything"/></variable></config>', where="h", context="host",
    ).variables[0]
    assert host.rrd_regex == "pif_.+_[rt]x" and host.alarm_trigger_sense == "low"


def test_refused_variables_are_logged_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    """Each variable perfmon would refuse is left out with its reason; the rest are kept."""
    doc = b"""<config>
  <variable><alarm_trigger_level value="1"/></variable>
  <variable><name value="mystery"/><alarm_trigger_level value="1"/></variable>
  <variable><name value="cpu_usage"/></variable>
  <variable><name value="a"/><rrd_regex value="(("/><alarm_trigger_level value="1"/></variable>
  <variable><name value="b"/><rrd_regex value="x"/><consolidation_fn value="min"/>
    <alarm_trigger_level value="1"/></variable>
  <variable><name value="c"/><rrd_regex value="x"/><alarm_trigger_period value="1m"/>
    <alarm_trigger_level value="1"/></variable>
  <variable><name value="d"/><rrd_regex value="x"/><alarm_trigger_level value=""/></variable>
  <variable><name value="disk_usage"/><alarm_trigger_level value="5e7"/></variable>
  <variable><name value="disk_usage"/><alarm_trigger_level value="6e7"/></variable>
</config>"""
    with caplog.at_level(logging.ERROR):
        got = parse_perfmon_config(doc, where="domain web metadata")
    assert [(v.name, v.alarm_trigger_level) for v in got.variables] == [("disk_usage", 6e7)]
    reasons = [r.split(": ", 1)[1] for r in got.refused]
    assert reasons == [
        "variable missing 'name' tag",
        "variable mystery: no default rrd_regex - please specify one",
        "variable cpu_usage: no default alarm_trigger_level - please specify one",
        "variable a: regex (( does not compile",
        "variable b: consolidation function min not supported",
        "variable c: alarm_trigger_period 1m not an int",
        "variable d: alarm_trigger_level  not a float",
    ]
    assert got.refused[0].startswith("domain web metadata:2")
    assert sum("variable skipped" in r.message for r in caplog.records) == 7


@pytest.mark.parametrize(("doc", "reason"), [
    (b"<config><variable>", "XML syntax error"),
    (b"<alarms/>", "expected <config>"),
    (b"<!DOCTYPE x [<!ENTITY e 'x'>]><config>&e;</config>", "perfmon config"),
    (b"<config>" + b" " * 300_000 + b"</config>", "at most"),
])
def test_unreadable_documents_raise_naming_where(doc: bytes, reason: str) -> None:
    """Not XML, another root, entities, too large: ConfigError naming the source."""
    with pytest.raises(ConfigError) as err:
        parse_perfmon_config(doc, where="domain web metadata")
    assert "domain web metadata" in str(err.value) and reason in str(err.value)


def test_perfmon_arithmetic() -> None:
    """sum([]) is 0, a NaN stays NaN (never bad); our format leaves NaN out, nothing is None."""
    nan = float("nan")
    assert consolidate("sum", [], dialect=PERFMON) == 0.0
    assert math.isnan(consolidate("sum", [1.0, nan], dialect=PERFMON) or 0.0)
    assert consolidate("average", [], dialect=PERFMON) is None
    assert consolidate("get_percent_fs_usage", [], dialect=PERFMON, fs_usage=0.42) == 0.42
    assert consolidate("sum", []) is None
    assert consolidate("sum", [1.0, nan]) == 1.0


def _engine(tmp: Path, variables: List[VariableConfig]) -> AlarmEngine:
    config = AlarmsConfig(
        state_dir=str(tmp), hook=None, hook_timeout=1.0, history=100,
        journal_socket=str(tmp / "none"), guest_metrics=False, host=(), vm=(), overrides=(),
        vm_resolved=tuple(variables),
    )
    return AlarmEngine(config, AlarmSink(config, state_dir=tmp), step=1)


def test_cpu_usage_is_a_fraction_of_the_vcpus(tmp_path: Path) -> None:
    """vCPUs at 60 % and 20 %: perfmon's cpu_usage 0.4 (level 0.35 fires), ours 40 %."""
    (var,) = parse_perfmon_config(
        b'<config><variable><name value="cpu_usage"/><alarm_trigger_level value="0.35"/>'
        b'<alarm_trigger_period value="3"/></variable></config>', where="t").variables
    engine = _engine(tmp_path, [var])
    adapter = RateAdapter(proc_root=str(tmp_path / "noproc"), sys_root=str(tmp_path / "nosys"))
    fired = []
    for i in range(6):
        vm = VmStats(uuid=UUID, name="w", id=1, vcpus=2, cpu_time=i * 8 * 10**8,
                     vcpu_times=(i * 6 * 10**8, i * 2 * 10**8))
        obs = adapter.update(CycleStats(wall=1000.0 + i, mono=float(i), host=HostStats(),
                                        vms=(vm,)))[1]
        if i == 0:
            assert math.isnan(obs.values["cpu0"])  # a rate needs two samples
        else:
            assert obs.values["cpu0"] == pytest.approx(0.6)
            assert obs.values["cpu1"] == pytest.approx(0.2)
            assert obs.values["cpu_usage"] == pytest.approx(40.0)  # our format: percent
        if engine.update([obs]):
            fired.append(i + 1)
    assert fired == [4]  # samples 2, 3, 4 bad (the first is NaN, which resets)


def test_network_usage_of_no_interface_is_zero(tmp_path: Path) -> None:
    """A VM without interfaces: perfmon's sum([]) = 0, a low-sense level above 0 fires."""
    (var,) = parse_perfmon_config(
        b'<config><variable><name value="network_usage"/><alarm_trigger_level value="10"/>'
        b'<alarm_trigger_sense value="low"/><alarm_trigger_period value="2"/></variable>'
        b"</config>", where="t").variables
    engine = _engine(tmp_path, [var])
    adapter = RateAdapter(proc_root=str(tmp_path), sys_root=str(tmp_path))
    fired = []
    for i in range(3):
        vm = VmStats(uuid=UUID, name="w", id=1)
        obs = adapter.update(CycleStats(wall=1000.0 + i, mono=float(i), host=HostStats(),
                                        vms=(vm,)))[1]
        if engine.update([obs]):
            fired.append(i + 1)
    assert fired == [2]


def test_host_sources_from_proc_and_sys(tmp_path: Path) -> None:
    """cpuN fractions from /proc/stat, pif_DEV rates of physical interfaces only."""
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    (proc / "net").mkdir(parents=True)
    (sys_ / "class/net/eth0/device").mkdir(parents=True)
    (sys_ / "class/net/vnet0").mkdir(parents=True)

    def write(i: int) -> None:
        (proc / "stat").write_text(
            f"cpu  {i * 100} 0 0 {i * 100} 0 0 0 0 0 0\n"
            f"cpu0 {i * 75} 0 0 {i * 25} 0 0 0 0 0 0\n"
            f"cpu1 {i * 25} 0 0 {i * 75} 0 0 0 0 0 0\nintr 5\n")
        (proc / "net/dev").write_text(
            "Inter-|   Receive |  Transmit\n face |bytes packets ...\n"
            f"    lo: {i * 999} 0 0 0 0 0 0 0 {i * 999} 0 0 0 0 0 0 0\n"
            f"  eth0: {i * 3000} 0 0 0 0 0 0 0 {i * 1000} 0 0 0 0 0 0 0\n"
            f" vnet0: {i * 500} 0 0 0 0 0 0 0 {i * 500} 0 0 0 0 0 0 0\n")

    adapter = RateAdapter(proc_root=str(proc), sys_root=str(sys_), fs_root=str(tmp_path))
    for i in range(2):
        write(i)
        host = adapter.update(CycleStats(wall=1000.0 + 2 * i, mono=2.0 * i, host=HostStats()))[0]
    assert {k: v for k, v in host.values.items() if k != "memory_free_kib"} == {
        "cpu0": 0.75, "cpu1": 0.25, "pif_eth0_rx": 1500.0, "pif_eth0_tx": 500.0}
    (var,) = parse_perfmon_config(
        b'<config><variable><name value="network_usage"/><alarm_trigger_level value="1999"/>'
        b"</config>".replace(b"</config>", b"</variable></config>"), where="h",
        context="host").variables
    from vhostmd_py.monitors.alarms import VariableState

    assert VariableState(var).select(host.values) == 2000.0


def test_fs_usage_is_dfs_percent(tmp_path: Path) -> None:
    """The used fraction as df prints it (rounded up to a percent), of the path's filesystem."""
    out = subprocess.run(["df", "-P", str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout.splitlines()[1].split()
    assert fs_usage(str(tmp_path)) == int(out[4].rstrip("%")) / 100
    assert fs_usage(str(tmp_path / "missing")) is None


def test_alarms_file_in_perfmons_format(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """<alarms file=...> naming a perfmon <config>: every VM's variables; a bad one skipped."""
    (tmp_path / "perfmon.xml").write_bytes(
        b'<config>\n<variable><name value="cpu_usage"/><alarm_trigger_level value="0.9"/>'
        b'</variable>\n<variable><name value="nope"/></variable>\n</config>\n')
    conf = write_conf(tmp_path / "c.xml", f'  <alarms file="perfmon.xml" state_dir="{tmp_path}"'
                      ' fs_usage_path="/var" hook_timeout="3"/>\n')
    with caplog.at_level(logging.ERROR):
        alarms = load_config(conf).alarms
    assert alarms is not None
    (cpu,) = alarms.variables_for_vm(UUID, "web")
    assert cpu.dialect == PERFMON and cpu.alarm_trigger_level == 0.9
    assert alarms.fs_usage_path == "/var" and alarms.hook_timeout == 3.0
    assert alarms.state_dir == str(tmp_path)
    assert any("perfmon.xml:3" in r.message and "nope" in r.message for r in caplog.records)
    assert os.path.basename(cpu.where).startswith("perfmon.xml:2")
