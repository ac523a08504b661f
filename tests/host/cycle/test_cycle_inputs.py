"""What a cycle reads does not depend on what <metrics> publishes; an empty
<metrics/> still publishes. Real daemon, the libvirt test driver, real disks."""

from __future__ import annotations

import asyncio
import itertools
import logging
from pathlib import Path

import pytest
from helpers.config import write_config
from vhostmd_wire.disk import read_disk

from vhostmd_py.config import Config
from vhostmd_py.cycle.render import EMPTY_DOCUMENT, document, parse_document
from vhostmd_py.daemon import Daemon
from vhostmd_py.process.life import load_config  # as the daemon loads: with the catalogue
from vhostmd_py.sources.shell.runner import ActionRunner

TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # test:///default's running domain
HOST_ONLY_BUILTIN = """    <metric type="int64" context="host">
      <name>Now</name>
      <source>host.time</source>
    </metric>
"""


def _runner(config: Config) -> ActionRunner:
    return ActionRunner(path=config.path, uri="test:///default", timeout=10)


def test_host_only_builtin_metrics_still_feed_vm_alarms_accounting_and_history(
    tmp_path: Path,
) -> None:
    """Only a host-context built-in metric is published: the VM's counters are read anyway."""
    state = tmp_path / "state"
    sections = f"""  <alarms state_dir="{state}" journal_socket="{tmp_path / 'journal.sock'}"
      guest_metrics="yes">
    <alarm><name>cpu_usage</name><alarm_trigger_level>90</alarm_trigger_level>
      <alarm_trigger_period>60</alarm_trigger_period></alarm>
  </alarms>
  <accounting period="1d" state_dir="{state}" guest_metrics="yes"><budget tx="1G"/></accounting>
"""
    conf = write_config(
        tmp_path / "c.xml", tmp_path / "vhostmd0", [HOST_ONLY_BUILTIN], size=256,
        extra=f'<history state_dir="{tmp_path / "history"}" publish="yes"/>',
        after_metrics=sections,
    )
    daemon = Daemon(load_config(conf), uri="test:///default", runner_factory=_runner,
                    publish=False)
    asyncio.run(daemon.run(max_cycles=3, signals=False))
    assert daemon.last_snapshot is not None
    doc = parse_document(document(daemon.last_snapshot))
    vm = {m.findtext("name"): m.findtext("value")
          for m in doc.iter("metric") if m.get("context") == "vm"}
    # Alarms: the VM's cpu_usage is evaluated.
    assert daemon.monitor is not None and daemon.monitor.alarms is not None
    cpu = daemon.monitor.alarms.state("vm", TEST_UUID, "cpu_usage")
    assert cpu is not None and cpu.value is not None
    assert vm["AlarmActive"] == "0"
    # Accounting: the VM is accounted (its period's usage and budget are published).
    assert vm["AccountingTxBudget"] == str(1024**3)
    assert "AccountingTxBytes" in vm
    # History: the VM's rates from two samples.
    assert vm["VMCPUUtilization"] is not None and float(vm["VMCPUUtilization"]) >= 0.0
    assert "VMNetTxRate" in vm


def test_empty_metrics_publish_an_empty_document_every_period(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """<metrics/> (no metric at all): each cycle publishes upstream's empty document."""
    disk = tmp_path / "vhostmd0"
    conf = write_config(tmp_path / "c.xml", disk, [])
    publishes = itertools.count(1)
    daemon = Daemon(load_config(conf), uri="test:///default", runner_factory=_runner,
                    wall=lambda: float(next(publishes)))
    daemon.open_disk()
    caplog.set_level(logging.ERROR)
    # With deadlines, as `vhostmd -d` runs its cycles.
    asyncio.run(daemon.run(max_cycles=3, signals=False, deadlines=True))
    assert "Metrics update failed" not in caplog.text
    assert daemon.cycles == 3
    health = daemon.health.read()
    assert health.publish_errors == 0
    assert health.last_publish == 3.0  # the third cycle's publish: one per period
    assert read_disk(disk) == EMPTY_DOCUMENT
