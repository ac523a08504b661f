"""Everything the daemon imports is imported before the privilege drop (process.life.preload).

The real daemon (cli.main in a child interpreter) runs a config with every
feature; the drop itself is replaced by a probe that records sys.modules at
that moment (no root needed), and at exit the child reports every module
imported after it: cycles, endpoint scrapes and a SIGHUP reload included.
Any such module is an import that fails after `-u USER` when the
installation is unreadable to USER (tests/integration/test_user_install.py
proves that case as root).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO
from helpers.config import metric_xml, write_config
from helpers.daemon import metrics_of, try_read, wait_for

pytestmark = pytest.mark.integration

PORT = re.compile(r"serving OpenMetrics on http://127\.0\.0\.1:(\d+)/metrics")
PROBE = """
import atexit, json, sys
import vhostmd_py.process.privileges as privileges
out = sys.argv.pop(1)
seen = {}
def drop(ident):
    seen["at_drop"] = set(sys.modules)
privileges.drop_privileges = drop
def report():
    late = sorted(set(sys.modules) - seen.get("at_drop", set(sys.modules)))
    with open(out, "w") as f:
        json.dump({"dropped": "at_drop" in seen, "late": late}, f)
atexit.register(report)
from vhostmd_py.cli import main
sys.argv[0] = "vhostmd"
main()
"""


def _config(tmp: Path, disk: Path, metrics: list[str]) -> Path:
    after = (f'  <alarms state_dir="{tmp / "alarms"}" journal_socket="{tmp / "journal.sock"}" '
             'guest_metrics="yes">\n'
             "    <alarm><name>cpu_usage</name><alarm_trigger_level>0.9</alarm_trigger_level>"
             "<alarm_trigger_period>60</alarm_trigger_period></alarm>\n  </alarms>\n"
             f'  <accounting period="1d" state_dir="{tmp / "accounting"}" guest_metrics="yes">'
             '<budget tx="1G"/></accounting>\n')
    extra = [f'<history state_dir="{tmp / "history"}" retention="1d" publish="yes"/>',
             '<metrics_endpoint address="127.0.0.1" port="0"/>',
             f'<freshness identity_key="{tmp / "identity.key"}"/>']
    (tmp / "channels").mkdir(exist_ok=True)
    return write_config(tmp / "vhostmd.conf", disk, metrics, size=256,
                        transports=("vbd", "virtio"),
                        virtio={"channel_path": tmp / "channels", "max_channels": 4,
                                "expiration_time": 15},
                        extra=extra, after_metrics=after)


def test_nothing_is_imported_after_the_drop(tmp_path: Path) -> None:
    """Every feature, -u: cycles, scrapes and a reload adding a vm metric import nothing new."""
    disk = tmp_path / "vhostmd0"
    name = metric_xml("Name", "string", "vm", "echo NAME")
    config = _config(tmp_path, disk, [name])
    report = tmp_path / "late.json"
    log = tmp_path / "daemon.log"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", PROBE, str(report), "-d", "-v", "-u", "nobody",
             "-p", str(tmp_path / "pid"), "-f", str(config), "-c", "test:///default"],
            stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        first = wait_for(lambda: try_read(disk), 20, "the first publish")
        assert metrics_of(first)[("Name", "1")] == "test"
        port = int(wait_for(lambda: PORT.search(log.read_text()), 10, "the endpoint").group(1))
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8",
                     "Accept-Encoding": "gzip"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        _config(tmp_path, disk, [name, metric_xml("Answer", "uint32", "vm", "echo 42")])
        proc.send_signal(signal.SIGHUP)
        content = wait_for(lambda: (c := try_read(disk)) and b"Answer" in c and c, 10,
                           "the reloaded config's metric")
        assert metrics_of(content)[("Answer", "1")] == "42"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
        wait_for(lambda: (c := try_read(disk)) and c != content, 5, "one more cycle")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = json.loads(report.read_text())
    assert result["dropped"], log.read_text()
    assert result["late"] == [], result["late"]
    assert "Traceback" not in log.read_text()
