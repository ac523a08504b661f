"""`-u nobody` from an installation nobody can read, every feature on.

The package is installed the way an operator does (pip, non-editable, into a
venv) under a 0700 directory owned by root; the interpreter's own library is
under /root here, 0700 too. After the privilege drop the daemon can import
nothing new: whatever a cycle, the endpoint or a reload needs must have been
imported before the drop (vhostmd_py.process.life.preload). The venv build
takes about half a minute (pip's cache), so these are `slow`.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, Iterator, List, TypeVar

import pytest
from helpers import REPO
from helpers.config import metric_xml, write_config
from helpers.daemon import metrics_of, try_read, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (-u nobody)"),
]

T = TypeVar("T")
PORT = re.compile(r"serving OpenMetrics on http://127\.0\.0\.1:(\d+)/metrics")
ACCEPT = "application/openmetrics-text; version=1.0.0; charset=utf-8"
INSTALL_TIMEOUT_S = 600


def _clean_env() -> Dict[str, str]:
    """The caller's environment without anything that would import the checkout."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


@pytest.fixture(scope="module")
def private_install() -> Iterator[Path]:
    """A venv under a root-owned 0700 directory, this tree pip-installed into it (not editable)."""
    private = Path(tempfile.mkdtemp(prefix="vhostmd-0700-", dir="/var/tmp"))
    try:
        os.chmod(private, 0o700)
        # The working tree's tracked files (uncommitted changes included), as a source tree.
        files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True,
                               check=True).stdout.split(b"\0")
        source = private / "src"
        for name in filter(None, files):
            target = source / os.fsdecode(name)
            if (REPO / os.fsdecode(name)).is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / os.fsdecode(name), target)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(private / "venv")], check=True,
                       env=_clean_env(), timeout=INSTALL_TIMEOUT_S)
        subprocess.run([str(private / "venv" / "bin" / "pip"), "install", "-q",
                        "--disable-pip-version-check", str(source / "guest"),
                        f"{source}[host]"], check=True, env=_clean_env(), cwd=private,
                       timeout=INSTALL_TIMEOUT_S, stdout=subprocess.DEVNULL)
        shutil.rmtree(source)
        assert not os.access(private, os.R_OK, effective_ids=False) or os.getuid() == 0
        yield private / "venv"
    finally:
        shutil.rmtree(private, ignore_errors=True)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory nobody can read (the config) with state directories nobody owns."""
    path = Path(tempfile.mkdtemp(prefix="vhostmd-u-", dir="/var/tmp"))
    try:
        os.chmod(path, 0o755)
        nobody = pwd.getpwnam("nobody")
        for name in ("history", "alarms", "accounting", "channels"):
            (path / name).mkdir()
            os.chown(path / name, nobody.pw_uid, nobody.pw_gid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Daemon:
    """The installed `vhostmd`, foreground, stderr to a file."""

    def __init__(self, venv: Path, args: List[str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - lives as long as the child
        env = _clean_env()
        self.proc = subprocess.Popen([str(venv / "bin" / "vhostmd"), *args], cwd="/",
                                     stdout=subprocess.DEVNULL, stderr=self._log, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()


def _every_feature(shared: Path, disk: Path, metrics: List[str]) -> Path:
    """vm metrics, virtio, history, alarms, accounting, freshness and the endpoint."""
    alarms = (f'  <alarms state_dir="{shared / "alarms"}" '
              f'journal_socket="{shared / "alarms" / "journal.sock"}" guest_metrics="yes">\n'
              "    <alarm><name>cpu_usage</name>"
              "<alarm_trigger_level>0.95</alarm_trigger_level>"
              "<alarm_trigger_period>60</alarm_trigger_period></alarm>\n"
              "  </alarms>\n"
              f'  <accounting period="1d" state_dir="{shared / "accounting"}" '
              'guest_metrics="yes">\n'
              '    <budget tx="1G" rx="1G" enforce="no"/>\n'
              "  </accounting>\n")
    extra = [f'<history state_dir="{shared / "history"}" retention="1d" publish="yes"/>',
             '<metrics_endpoint address="127.0.0.1" port="0"/>',
             f'<freshness identity_key="{shared / "identity.key"}"/>']
    return write_config(shared / "vhostmd.conf", disk, metrics, size=256,
                        transports=("vbd", "virtio"),
                        virtio={"channel_path": shared / "channels", "max_channels": 4,
                                "expiration_time": 15},
                        extra=extra, after_metrics=alarms)


def _wait(daemon: Daemon, probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """wait_for, failing with the daemon's log."""
    try:
        return wait_for(probe, timeout, what)
    except AssertionError as err:
        raise AssertionError(f"{err}; the daemon's log:\n{daemon.log()[-4000:]}") from None


def _scrape(port: int) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Accept": ACCEPT})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
        return response.read().decode()


def test_every_feature_under_u_nobody_then_a_reload_adds_a_vm_metric(
    private_install: Path, shared: Path
) -> None:
    """Published as nobody with every feature; the endpoint answers; SIGHUP adds a vm metric."""
    disk = shared / "vhostmd0"
    name = metric_xml("Name", "string", "vm", "echo NAME")
    config = _every_feature(shared, disk, [name])
    daemon = Daemon(private_install, ["-d", "-v", "-u", "nobody", "-p",
                                      str(shared / "vhostmd.pid"), "-f", str(config),
                                      "-c", "test:///default"], shared / "daemon.log")
    try:
        first = _wait(daemon, lambda: try_read(disk), 20, "the first publish")
        values = metrics_of(first)
        assert values[("Name", "1")] == "test", values
        assert ("PublicationTime", "host") in values, values  # freshness
        assert ("HostIdentity", "host") in values, values
        assert pwd.getpwuid(os.stat(f"/proc/{daemon.proc.pid}").st_uid).pw_name == "nobody"
        port = int(_wait(daemon, lambda: PORT.search(daemon.log()), 10, "the endpoint").group(1))
        assert "vhostmd_" in _scrape(port)
        # Two more cycles: history, alarms and accounting have run as nobody.
        later = _wait(daemon, lambda: (c := try_read(disk)) and c != first and c, 5,
                      "a later publish")
        _wait(daemon, lambda: (c := try_read(disk)) and c != later and c, 5, "another publish")

        answer = metric_xml("Answer", "uint32", "vm", "echo 42")
        _every_feature(shared, disk, [name, answer])
        os.kill(daemon.proc.pid, signal.SIGHUP)
        _wait(daemon, lambda: "Reloaded configuration" in daemon.log()
                 or "Not reloading" in daemon.log(), 10, "the reload")
        content = _wait(daemon, lambda: (c := try_read(disk)) and b"Answer" in c and c, 10,
                           "the new vm metric")
        assert metrics_of(content)[("Answer", "1")] == "42"
        assert "vhostmd_" in _scrape(port)
        time.sleep(1.5)  # one more cycle after the reload
        assert daemon.proc.poll() is None, daemon.log()
    finally:
        code = daemon.stop()
    log = daemon.log()
    assert code == 0, log
    for bad in ("Traceback", "ModuleNotFoundError", "Not reloading", "No module named"):
        assert bad not in log, log
    assert not (shared / "vhostmd.pid").exists()


def test_a_reload_needing_a_module_not_loaded_is_refused_keeping_the_old_config(
    private_install: Path, shared: Path
) -> None:
    """Host metrics only under -u nobody; SIGHUP to a config with the history (its modules,
    and libvirt's, not imported before the drop, not importable after it): one line says
    so, the old config goes on."""
    disk = shared / "vhostmd0"
    flag = shared / "value"
    flag.write_text("1\n")
    os.chmod(flag, 0o644)
    value = ("Value", "string", "host", f"cat {flag}")
    config = write_config(shared / "vhostmd.conf", disk, [value])
    daemon = Daemon(private_install, ["-d", "-u", "nobody", "-p", str(shared / "vhostmd.pid"),
                                      "-f", str(config), "-c", "test:///default"],
                    shared / "daemon.log")
    try:
        _wait(daemon, lambda: (c := try_read(disk)) and b"<value>1</value>" in c, 20,
                 "the first publish")
        write_config(shared / "vhostmd.conf", disk, [value, ("New", "string", "host", "echo new")],
                     extra=[f'<history state_dir="{shared / "history"}" retention="1d"/>'])
        os.kill(daemon.proc.pid, signal.SIGHUP)
        line = _wait(daemon, lambda: next((x for x in daemon.log().splitlines()
                                      if "Not reloading" in x), None), 10, "the refusal")
        assert "cannot be imported now" in line and "restart vhostmd" in line, line
        flag.write_text("2\n")
        content = _wait(daemon, lambda: (c := try_read(disk)) and b"<value>2</value>" in c and c, 5,
                           "the old config still publishing")
        assert b"New" not in content
        assert daemon.proc.poll() is None
    finally:
        code = daemon.stop()
    log = daemon.log()
    assert code == 0, log
    assert log.count("Not reloading") == 1, log
    assert "Traceback" not in log, log
