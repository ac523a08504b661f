"""A host without libvirt-python (no `[host]` extra): one clear line, host metrics only.

The daemon used to log a 15-line ImportError traceback every
cycle. The daemon runs in a real interpreter where `import libvirt` fails, as
on such a host: a meta-path finder installed before vhostmd_py is imported
refuses the module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from helpers import REPO
from helpers.config import write_config
from lxml import etree
from vhostmd_wire.disk import read_disk

# Runs `vhostmd` with libvirt (and its C part, libvirtmod) impossible to import.
NO_LIBVIRT = """
import sys

class NoLibvirt:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("libvirt", "libvirtmod", "libvirtmod_qemu", "libvirt_qemu"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoLibvirt())
if sys.argv[1:] == ["--probe"]:
    import libvirt
from vhostmd_py.cli import main
main()
"""

METRICS = [("Stamp", "string", "host", "date +%s%N"), ("VmName", "string", "vm", "echo NAME")]


def _env() -> Dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


def _values(disk: Path) -> Dict[str, str]:
    root = etree.fromstring(read_disk(disk, busy_timeout=2))
    return {str(m.findtext("name")): str(m.findtext("value")) for m in root.iter("metric")}


def test_the_blocker_really_hides_libvirt() -> None:
    """Sanity: in that interpreter `import libvirt` fails (else the tests below prove nothing)."""
    proc = subprocess.run([sys.executable, "-c", NO_LIBVIRT, "--probe"], capture_output=True,
                          env=_env(), timeout=30, check=False)
    assert proc.returncode == 1
    assert b"ModuleNotFoundError: No module named 'libvirt'" in proc.stderr


def test_one_line_over_three_cycles_and_host_metrics_published(shm_dir: Path) -> None:
    """Three cycles without libvirt-python: one stderr line saying how to install it."""
    disk = shm_dir / "vhostmd0"
    config = shm_dir / "vhostmd.conf"
    write_config(config, disk, METRICS, doctype=False)
    log_path = shm_dir / "stderr.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            # -p: as root, -d alone would take the default /var/run/vhostmd.pid.
            [sys.executable, "-c", NO_LIBVIRT, "-d", "-f", str(config), "-c", "test:///default",
             "-p", str(shm_dir / "vhostmd.pid")],
            stdout=subprocess.DEVNULL, stderr=log, env=_env(),
        )
    try:
        stamps: List[str] = []
        deadline = time.monotonic() + 20
        while len(stamps) < 3 and time.monotonic() < deadline and proc.poll() is None:
            try:
                stamp = _values(disk).get("Stamp")
            except Exception:
                stamp = None
            if stamp is not None and stamp not in stamps:
                stamps.append(stamp)
            time.sleep(0.1)
        assert len(stamps) == 3, log_path.read_text()
        assert "VmName" not in _values(disk)  # no VMs without libvirt
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # Everything but the two lines an operator always gets (start-up, first publish).
    lines = [line for line in log_path.read_text().splitlines()
             if not line.startswith("vhostmd: INFO: ")]
    assert len(lines) == 1, log_path.read_text()
    assert "libvirt-python is not installed" in lines[0]
    assert "pip install 'vhostmd-py[host]'" in lines[0] and "python3-libvirt" in lines[0]
    assert "Traceback" not in log_path.read_text()


def test_once_and_user_work_without_libvirt(shm_dir: Path) -> None:
    """--once publishes host metrics and exits 0; the one line is on stderr."""
    disk = shm_dir / "vhostmd0"
    config = shm_dir / "vhostmd.conf"
    write_config(config, disk, METRICS, doctype=False)
    args = ["-d", "--once", "-f", str(config), "-c", "test:///default"]
    if os.geteuid() == 0:
        # -u preloads libvirt before dropping privileges: that must not fail either.
        os.chmod(shm_dir, 0o755)
        args += ["-u", "nobody"]
    proc = subprocess.run([sys.executable, "-c", NO_LIBVIRT, *args], capture_output=True,
                          env=_env(), timeout=60, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert err.count("libvirt-python is not installed") == 1
    assert "Traceback" not in err
    assert "Stamp" in _values(disk)
