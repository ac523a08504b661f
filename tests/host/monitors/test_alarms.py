"""Alarms: perfmon timing through the daemon's cycle, reload, sinks (journal, hook, state, ctl)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
from helpers.monitor import ScriptedSource, fast_clock, write_conf

from vhostmd_py.config import Config, load_config
from vhostmd_py.cycle.render import document, parse_document
from vhostmd_py.daemon import Daemon
from vhostmd_py.errors import ConfigError
from vhostmd_py.monitors.alarms import Alarm, AlarmSink, HookRunner, journal_payload, run_hook
from vhostmd_py.sources.shell.runner import ActionRunner

TEST_VM = "test"  # test:///default's one running domain


def _runner(config: Config) -> ActionRunner:
    return ActionRunner(path=config.path, uri="test:///default", timeout=10)


def _alarms_section(tmp: Path, variables: str, attrs: str = "") -> str:
    return (
        f'  <alarms state_dir="{tmp / "state"}" journal_socket="{tmp / "journal.sock"}"'
        f' guest_metrics="yes" {attrs}>\n{variables}  </alarms>\n'
    )


CPU = """    <alarm><name>cpu_usage</name><alarm_trigger_level>{level}</alarm_trigger_level>
      <alarm_trigger_period>60</alarm_trigger_period>
      <alarm_auto_inhibit_period>{inhibit}</alarm_auto_inhibit_period></alarm>
"""
NET = """    <alarm><name>network_usage</name><alarm_trigger_level>1000</alarm_trigger_level>
      <alarm_trigger_period>60</alarm_trigger_period></alarm>
"""


def _run(daemon: Daemon, cycles: int, source: ScriptedSource) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        source.loop = loop  # type: ignore[attr-defined]
        await daemon.run(max_cycles=cycles, signals=False)

    asyncio.run(main())


def _daemon(conf: Path, source: ScriptedSource, uri: str = "test:///default") -> Daemon:
    return Daemon(
        load_config(conf),
        uri=uri,
        runner_factory=_runner,
        config_loader=load_config,
        clock=fast_clock(),
        publish=False,
        stats_source=source,
    )


def _recent(tmp: Path) -> List[Dict[str, Any]]:
    data = json.loads((tmp / "state" / "alarms.json").read_text())
    return list(data["recent"])


def test_fires_after_exactly_the_trigger_period_then_inhibited(tmp_path: Path) -> None:
    """Bad for 50 s: nothing; bad for 60 s: one alarm; then one per inhibit period only."""
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal.sock"))
    journal.setblocking(False)
    conf = write_conf(
        tmp_path / "c.xml", _alarms_section(tmp_path, CPU.format(level=90, inhibit=150))
    )
    bad, good = {TEST_VM: (95.0, 0.0)}, {TEST_VM: (50.0, 0.0)}
    # cycle 0 is the baseline (no rate yet); 1-5 bad (50 s), 6 good, 7.. bad.
    steps = [good] + [bad] * 5 + [good] + [bad] * 30
    source = ScriptedSource(steps)
    daemon = _daemon(conf, source)
    _run(daemon, 7 + 6 + 18 + 1, source)
    times = [a["time"] for a in _recent(tmp_path)]
    t0 = source.times[0]
    # First alarm: bad at cycles 7..12 -> 60 s at cycle 12. Not at cycle 11 (50 s).
    # Next due at +60 and +120 are inhibited (< 150 s); +180 fires.
    assert times == [t0 + 120, t0 + 300]
    alarm = _recent(tmp_path)[0]
    assert alarm["variable"] == "cpu_usage" and alarm["name"] == TEST_VM
    assert alarm["value"] == pytest.approx(95.0)
    fields: List[Dict[str, str]] = []
    while True:
        try:
            payload = journal.recv(65536)
        except BlockingIOError:
            break
        fields.append(dict(line.split("=", 1) for line in payload.decode().splitlines()))
    journal.close()
    assert [f["VHOSTMD_ALARM_VARIABLE"] for f in fields] == ["cpu_usage", "cpu_usage"]
    assert fields[0]["VHOSTMD_ALARM_NAME"] == TEST_VM
    assert fields[0]["PRIORITY"] == "4" and fields[0]["SYSLOG_IDENTIFIER"] == "vhostmd"
    assert fields[0]["VHOSTMD_ALARM_TIME"] == f"{t0 + 120:.3f}"
    # Still bad at the end: active, and the guest sees it in its own block only.
    state = json.loads((tmp_path / "state" / "alarms.json").read_text())
    assert [a["variable"] for a in state["active"]] == ["cpu_usage"]
    assert daemon.last_snapshot is not None
    doc = parse_document(document(daemon.last_snapshot))
    got = {
        m.findtext("name"): (m.get("uuid"), m.findtext("value")) for m in doc.iter("metric")
    }
    uuid = state["active"][0]["uuid"]
    assert got["AlarmActive"] == (uuid, "1")
    assert got["AlarmActiveVariables"] == (uuid, "cpu_usage")


def test_good_sample_clears_and_restarts_the_count(tmp_path: Path) -> None:
    """Bad 50 s, good, bad 50 s, good ...: never an alarm; active clears when good."""
    conf = write_conf(
        tmp_path / "c.xml", _alarms_section(tmp_path, CPU.format(level=90, inhibit=0))
    )
    bad, good = {TEST_VM: (95.0, 0.0)}, {TEST_VM: (50.0, 0.0)}
    steps = [good] + ([bad] * 5 + [good]) * 3 + [bad] * 6 + [good]
    source = ScriptedSource(steps)
    daemon = _daemon(conf, source)
    _run(daemon, len(steps), source)
    t0 = source.times[0]
    assert [a["time"] for a in _recent(tmp_path)] == [t0 + 240]
    state = json.loads((tmp_path / "state" / "alarms.json").read_text())
    assert state["active"] == []  # the last sample was good


def test_reload_resets_only_the_changed_variable(tmp_path: Path) -> None:
    """SIGHUP changing cpu_usage's level restarts its count; network_usage keeps its own."""
    conf = write_conf(
        tmp_path / "c.xml", _alarms_section(tmp_path, CPU.format(level=90, inhibit=3600) + NET)
    )
    steps = [{TEST_VM: (0.0, 0.0)}] + [{TEST_VM: (95.0, 5000.0)}] * 20
    daemon: Daemon

    def on_step(index: int) -> None:
        if index == 3:  # during cycle 3: new level for cpu_usage only
            write_conf(
                tmp_path / "c.xml",
                _alarms_section(tmp_path, CPU.format(level=80, inhibit=3600) + NET),
            )
            source.loop.call_soon_threadsafe(daemon.request_reload)  # type: ignore[attr-defined]

    source = ScriptedSource(steps, on_step=on_step)
    daemon = _daemon(conf, source)
    _run(daemon, 12, source)
    t0 = source.times[0]
    got = sorted((a["time"] - t0, a["variable"]) for a in _recent(tmp_path))
    # network_usage: bad from cycle 1, 60 s at cycle 6. cpu_usage: restarted at
    # cycle 4 (first sample after the reload counts one period), 60 s at cycle 9.
    assert got == [(60.0, "network_usage"), (90.0, "cpu_usage")]


def test_unchanged_reload_keeps_all_state(tmp_path: Path) -> None:
    """A reload of the same file changes nothing: the alarm comes at the original time."""
    section = _alarms_section(tmp_path, CPU.format(level=90, inhibit=0))
    conf = write_conf(tmp_path / "c.xml", section)
    steps = [{TEST_VM: (0.0, 0.0)}] + [{TEST_VM: (95.0, 0.0)}] * 10
    daemon: Daemon

    def on_step(index: int) -> None:
        if index == 3:
            source.loop.call_soon_threadsafe(daemon.request_reload)  # type: ignore[attr-defined]

    source = ScriptedSource(steps, on_step=on_step)
    daemon = _daemon(conf, source)
    _run(daemon, 8, source)
    assert [a["time"] - source.times[0] for a in _recent(tmp_path)] == [60.0]


# --- configuration ------------------------------------------------------------


def test_defaults_and_per_vm_overrides(tmp_path: Path) -> None:
    """perfmon's defaults per variable; a VM override changes only the fields it gives."""
    section = _alarms_section(
        tmp_path,
        CPU.format(level=90, inhibit=3600)
        + """    <alarm><name>memory_free_kib</name>
      <alarm_trigger_level>1024</alarm_trigger_level></alarm>
    <alarm context="host"><name>cpu_usage</name>
      <alarm_trigger_level>99</alarm_trigger_level></alarm>
    <vm name="web"><alarm><name>cpu_usage</name>
      <alarm_trigger_level>50</alarm_trigger_level></alarm>
      <alarm enabled="no"><name>memory_free_kib</name></alarm></vm>
""",
    )
    config = load_config(write_conf(tmp_path / "c.xml", section))
    assert config.alarms is not None
    host = config.alarms.host[0]
    assert (host.consolidation_fn, host.alarm_trigger_period, host.alarm_auto_inhibit_period,
            host.alarm_priority, host.alarm_trigger_sense) == ("average", 60, 3600, 5, "high")
    other = {v.name: v for v in config.alarms.variables_for_vm("u1", "db")}
    web = {v.name: v for v in config.alarms.variables_for_vm("u2", "web")}
    assert other["memory_free_kib"].alarm_trigger_sense == "low"
    assert other["cpu_usage"].alarm_trigger_level == 90
    assert web["cpu_usage"].alarm_trigger_level == 50
    assert web["cpu_usage"].alarm_trigger_period == 60  # inherited from the section's default
    assert "memory_free_kib" not in web


@pytest.mark.parametrize(
    ("alarm", "reason"),
    [
        ("<alarm><name>cpu_usage</name></alarm>", "no alarm_trigger_level"),
        ("<alarm><name>x</name><alarm_trigger_level>1</alarm_trigger_level>"
         "<rrd_regex>(</rrd_regex></alarm>", "does not compile"),
        ("<alarm><name>x</name><alarm_trigger_level>high</alarm_trigger_level></alarm>",
         "not a number"),
        ("<alarm><name>x</name><alarm_trigger_level>1</alarm_trigger_level>"
         "<consolidation_fn>median</consolidation_fn></alarm>", "not supported"),
        ("<vm><alarm><name>x</name></alarm></vm>", "needs a name or a uuid"),
    ],
)
def test_config_errors_name_file_and_line(tmp_path: Path, alarm: str, reason: str) -> None:
    """An invalid alarm variable is a ConfigError at its own line."""
    conf = write_conf(tmp_path / "c.xml", f"  <alarms>\n\n    {alarm}\n  </alarms>\n")
    with pytest.raises(ConfigError) as info:
        load_config(conf)
    assert reason in info.value.reason
    assert info.value.file == str(conf)
    assert info.value.line == conf.read_text().splitlines().index(f"    {alarm}") + 1


def test_included_file_errors_name_that_file(tmp_path: Path) -> None:
    """<alarms file=...>: the included file is validated; errors name it and its line."""
    (tmp_path / "alarms.xml").write_text(
        '<alarms hook="/bin/true">\n  <alarm><name>cpu_usage</name>\n'
        "  <alarm_trigger_level>9</alarm_trigger_level></alarm>\n  <bogus/>\n</alarms>\n"
    )
    conf = write_conf(tmp_path / "c.xml", '  <alarms file="alarms.xml"/>\n')
    with pytest.raises(ConfigError) as info:
        load_config(conf)
    assert info.value.file.endswith("alarms.xml") and info.value.line == 4
    (tmp_path / "alarms.xml").write_text(
        '<alarms hook="/bin/true">\n  <alarm><name>cpu_usage</name>\n'
        "  <alarm_trigger_level>9</alarm_trigger_level></alarm>\n</alarms>\n"
    )
    config = load_config(conf)
    assert config.alarms is not None and config.alarms.hook == "/bin/true"
    assert config.alarms.vm[0].name == "cpu_usage"


def test_upstream_config_still_loads_without_sections(upstream: Path) -> None:
    """A config without the extension has neither section."""
    config = load_config(upstream / "configs" / "basic-1k.xml")
    assert config.alarms is None and config.accounting is None


# --- hook -----------------------------------------------------------------------


def _alarm(name: str) -> Alarm:
    return Alarm(time.time(), "vm", "00000000-0000-4000-8000-0000000000d1", name, "cpu_usage",
                 95.0, 90.0, "high", 60, 5, f"VM {name}: cpu_usage = 95")


def _hook(tmp_path: Path, body: str) -> Path:
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\n" + body)
    hook.chmod(0o755)
    return hook


NODE = """<node>
  <cpu><mhz>2000</mhz><model>i686</model><active>2</active><nodes>1</nodes>
    <sockets>1</sockets><cores>2</cores><threads>1</threads></cpu>
  <memory>16777216</memory>
  <domain type='test'>
    <name>{name}</name>
    <uuid>00000000-0000-4000-8000-0000000000d1</uuid>
    <memory unit='KiB'>1048576</memory><vcpu>1</vcpu>
    <os><type arch='x86_64'>hvm</type></os>
  </domain>
</node>
"""


def test_hook_gets_an_odd_vm_name_verbatim_and_runs_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real test-driver domain named with shell syntax: the hook runs, nothing else does."""
    odd = "$(touch pwned1) `touch pwned2`; touch pwned3 && touch 'pwned4'"
    (tmp_path / "node.xml").write_text(NODE.format(name=odd.replace("&", "&amp;")))
    out = tmp_path / "out"
    hook = _hook(tmp_path, f'env | grep ^VHOSTMD_ALARM_ | sort > "{out}.env"\n'
                           f'printf "%s" "$VHOSTMD_ALARM_NAME" > "{out}"\n')
    monkeypatch.chdir(tmp_path)  # where an injected `touch` would land
    conf = write_conf(tmp_path / "c.xml", _alarms_section(
        tmp_path, CPU.format(level=90, inhibit=0), attrs=f'hook="{hook}" hook_timeout="5"'))
    source = ScriptedSource([{odd: (0.0, 0.0)}] + [{odd: (99.0, 0.0)}] * 6)
    daemon = _daemon(conf, source, uri=f"test://{tmp_path / 'node.xml'}")
    hooks = HookRunner()
    assert daemon.monitor is not None and daemon.monitor.sink is not None
    daemon.monitor.sink.hooks = hooks
    _run(daemon, 7, source)
    hooks.join()
    assert hooks.results == [0]
    assert out.read_text() == odd
    env = out.with_suffix(".env").read_text()
    assert "VHOSTMD_ALARM_VARIABLE=cpu_usage\n" in env
    assert "VHOSTMD_ALARM_UUID=00000000-0000-4000-8000-0000000000d1\n" in env
    assert sorted(p.name for p in tmp_path.glob("pwned*")) == []


def test_hook_with_absolute_path_injection(tmp_path: Path) -> None:
    """The brief's name, aimed at a path of ours: no file appears."""
    target = tmp_path / "x"
    out = tmp_path / "out"
    hook = _hook(tmp_path, f'printf "%s" "$VHOSTMD_ALARM_NAME" > "{out}"\n')
    config = load_config(write_conf(tmp_path / "c.xml", _alarms_section(
        tmp_path, CPU.format(level=1, inhibit=0), attrs=f'hook="{hook}"')))
    assert config.alarms is not None
    sink = AlarmSink(config.alarms)
    sink.emit(_alarm(f"$(touch {target})"))
    sink.hooks.join()
    assert out.read_text() == f"$(touch {target})"
    assert not target.exists()


@pytest.mark.slow
def test_hook_killed_on_timeout_with_its_children(tmp_path: Path) -> None:
    """A hook that hangs (and forks) is killed as a group after its timeout."""
    pidfile = tmp_path / "child.pid"
    hook = _hook(tmp_path, f'sleep 60 & echo $! > "{pidfile}"\nsleep 60\n')
    started = time.monotonic()
    assert run_hook([str(hook)], {"PATH": "/usr/bin:/bin"}, 0.5) is None
    assert time.monotonic() - started < 5
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the hook's child survived the timeout")


def test_journal_payload_binary_form_for_multiline_values() -> None:
    """Values with a newline use the length-prefixed form of the native protocol."""
    payload = journal_payload({"A": "one", "B": "two\nlines"})
    assert payload == b"A=one\nB\n" + (9).to_bytes(8, "little") + b"two\nlines\n"


# --- vhostmdctl -----------------------------------------------------------------


def test_vhostmdctl_alarms_json_and_text(tmp_path: Path) -> None:
    """vhostmdctl alarms reads the state file the daemon wrote (a real subprocess)."""
    config = load_config(write_conf(tmp_path / "c.xml", _alarms_section(
        tmp_path, CPU.format(level=1, inhibit=0), attrs='history="3"')))
    assert config.alarms is not None
    sink = AlarmSink(config.alarms)
    for i in range(5):
        sink.emit(_alarm(f"vm{i}"))
    sink.save([{"object": "vm", "uuid": "u", "name": "vm4", "variable": "cpu_usage",
                "value": 95.0, "since": 1.0, "priority": 5}])
    ctl = [sys.executable, "-m", "vhostmd_py.ctl.main"]
    res = subprocess.run([*ctl, "alarms", "--state-dir", str(tmp_path / "state"),
                          "--format", "json"], capture_output=True, text=True, check=True)
    data = json.loads(res.stdout)
    assert [a["name"] for a in data["recent"]] == ["vm2", "vm3", "vm4"]  # bounded history
    assert data["active"][0]["variable"] == "cpu_usage"
    res = subprocess.run([*ctl, "alarms", "--state-dir", str(tmp_path / "state"), "--active"],
                         capture_output=True, text=True, check=True)
    assert res.stdout.startswith("Active alarms: 1\n") and "vm4 (u)  cpu_usage" in res.stdout
    res = subprocess.run([*ctl, "alarms", "--state-dir", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "no such file" in res.stderr
