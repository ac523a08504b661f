"""perfmon's own <config> in a domain's libvirt metadata: that VM's alarms, perfmon's timing.

libvirt's test driver holds three domains: `a` carries perfmon's XML (a
cpu_usage fraction of 0.5 over 30 s), `b` a broken policy (ignored for it
only), `c` none; vhostmd.conf's own cpu_usage (percent, 90 over 60 s) is
every VM's. Scripted statistics, a 10 s period: perfmon's step rule fires
a's alarm at its 3rd bad sample and b's and c's at their 6th.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

import pytest
from helpers.monitor import ScriptedSource, fast_clock, write_conf

from vhostmd_py.config import Config, load_config
from vhostmd_py.daemon import Daemon
from vhostmd_py.libvirt_host import Host
from vhostmd_py.sources.metadata import NAMESPACE
from vhostmd_py.sources.shell.runner import ActionRunner

libvirt = pytest.importorskip("libvirt")

PERFMON = ('<v:config><v:variable><v:name value="cpu_usage"/>'
           '<v:alarm_trigger_level value="0.5"/><v:alarm_trigger_period value="30"/>'
           '<v:alarm_auto_inhibit_period value="3600"/></v:variable>'
           '<v:variable><v:name value="memory_free_kib"/><v:rrd_regex value="(unclosed"/>'
           "</v:variable></v:config>")


def _domain(name: str, n: int, meta: str = "") -> str:
    metadata = f"<metadata>{meta}</metadata>" if meta else ""
    return (f"<domain type='test'><name>{name}</name>"
            f"<uuid>00000000-0000-4000-8000-0000000002{n:02d}</uuid>{metadata}"
            "<memory unit='KiB'>1048576</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64'>hvm</type></os></domain>")


class PerVcpuSource(ScriptedSource):
    """The scripted statistics with the one vCPU's time too (perfmon's cpu0 source)."""

    def __call__(self, vms: List[Any]) -> Any:
        stats = super().__call__(vms)
        return replace(stats, vms=tuple(replace(v, vcpu_times=(v.cpu_time or 0,))
                                        for v in stats.vms))


def _runner(config: Config) -> ActionRunner:
    return ActionRunner(path=config.path, uri="test:///default", timeout=10)


def test_perfmon_xml_in_metadata_raises_that_vms_alarm_with_perfmons_timing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node = tmp_path / "node.xml"
    node.write_text(
        "<node><cpu><mhz>2000</mhz><model>i686</model><active>2</active><nodes>1</nodes>"
        "<sockets>1</sockets><cores>2</cores><threads>1</threads></cpu>"
        "<memory>16777216</memory>"
        + _domain("a", 1, f'<v:policy xmlns:v="{NAMESPACE}">{PERFMON}</v:policy>')
        + _domain("b", 2, f'<v:policy xmlns:v="{NAMESPACE}" blocked="maybe">{PERFMON}'
                          "</v:policy>")
        + _domain("c", 3) + "</node>")
    state = tmp_path / "state"
    conf = write_conf(tmp_path / "c.xml", f"""  <alarms state_dir="{state}"
      journal_socket="{tmp_path / 'journal.sock'}">
    <alarm><name>cpu_usage</name><alarm_trigger_level>90</alarm_trigger_level>
      <alarm_trigger_period>60</alarm_trigger_period>
      <alarm_auto_inhibit_period>3600</alarm_auto_inhibit_period></alarm>
  </alarms>
  <policy refresh="1h" state_dir="{state}"/>
""")
    # Sample 0 is the baseline (no rate yet); then a at 60 %, b and c at 95 %, 8 samples.
    source = PerVcpuSource([{}] + [{"a": (60.0, 0.0), "b": (95.0, 0.0), "c": (95.0, 0.0)}] * 8)
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    conn = libvirt.open(f"test://{node}")
    try:
        daemon = Daemon(load_config(conf), uri=f"test://{node}", runner_factory=_runner,
                        clock=fast_clock(), publish=False, stats_source=source,
                        host=Host(f"test://{node}", read_only=conn))
        asyncio.run(daemon.run(max_cycles=9, signals=False))
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
    recent: List[Dict[str, Any]] = json.loads((state / "alarms.json").read_text())["recent"]
    t0 = source.times[0]
    fired = sorted((a["name"], a["time"] - t0, a["variable"]) for a in recent)
    assert fired == [("a", 30.0, "cpu_usage"), ("b", 60.0, "cpu_usage"),
                     ("c", 60.0, "cpu_usage")]
    by_name = {a["name"]: a for a in recent}
    assert by_name["a"]["level"] == pytest.approx(0.5)  # perfmon's fraction, its own level
    assert by_name["c"]["level"] == pytest.approx(90)
    # The broken policy and the refused variable are logged, with the domain, and skipped.
    assert "policy in the metadata of VM 'b'" in caplog.text
    assert "(unclosed" in caplog.text
    table = {row["name"]: row for row in
             json.loads((state / "policy.json").read_text())["vms"].values()}
    assert table["a"]["alarms"] == [{"name": "cpu_usage", "origin": "metadata"}]
    assert table["c"]["alarms"] == [{"name": "cpu_usage", "origin": "config"}]
    assert table["b"]["alarms"] == [{"name": "cpu_usage", "origin": "config"}]
