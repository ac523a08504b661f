"""`scripts/install-host` from a fresh clone, as OPERATIONS.md says, and the daemon it installs.

Run from a checkout, the script's check imported the
checkout's sources (no built extension) instead of the venv's, reported
"the C extension did not build" and left a half-installed venv. The venv
build takes about a minute (pip's cache is used), so these are `slow`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict

import pytest
from helpers import REPO
from lxml import etree
from vhostmd_wire.disk import read_disk

pytestmark = pytest.mark.slow

INSTALL_TIMEOUT_S = 900


def _env() -> Dict[str, str]:
    """The caller's environment without anything that would import the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    # The venv's bin first, as after `ln -s` into /usr/local/sbin; not ours.
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":")
                           if not p.startswith(str(REPO)))
    return env


def _fresh_clone(dest: Path) -> Path:
    """A `git clone` of this checkout's HEAD commit (committed files only)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(REPO), str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "checkout", "-q", "--detach", head], check=True)
    return dest


def test_fresh_clone_install_host_then_the_installed_daemon_publishes(
    tmp_path: Path, shm_dir: Path
) -> None:
    """Fresh clone -> `install-host --root DIR --prefix P --no-packages` -> moved to P -> --once.

    --root is for packagers: the venv is built under DIR, relocated to its
    final place P (scripts, pyvenv.cfg and byte code name P, never DIR),
    and runs once moved there. P is under tmp_path, so the move is real.
    """
    clone = _fresh_clone(tmp_path / "clone")
    root = tmp_path / "root"
    final = tmp_path / "final" / "vhostmd-py"
    started = time.monotonic()
    proc = subprocess.run(
        ["scripts/install-host", "--root", str(root), "--prefix", str(final), "--no-packages"],
        cwd=clone, env=_env(), capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    took = time.monotonic() - started
    print(f"install-host took {took:.1f} s")  # reported with -s / -rP
    assert proc.returncode == 0, proc.stderr
    assert "did not build" not in proc.stderr
    # The paths it prints are where the files are: under DIR.
    assert f"{root}/etc/libvirt/hooks/" in proc.stderr
    assert f"{root}/usr/local/sbin/vhostmd" in proc.stderr

    staged = Path(f"{root}{final}")
    for path in [*(staged / "bin").iterdir(), staged / "pyvenv.cfg"]:
        if path.is_file() and not path.is_symlink():
            assert str(root) not in path.read_text(errors="replace"), path
    links = {"sbin/vhostmd": "vhostmd", "bin/vhostmdctl": "vhostmdctl",
             "bin/vm-dump-metrics": "vm-dump-metrics"}
    for link, command in links.items():
        assert os.readlink(root / "usr" / "local" / link) == str(final / "bin" / command), link
    final.parent.mkdir(parents=True)
    staged.rename(final)
    venv = final
    for name in ("vhostmd.conf", "vhostmd.dtd", "metric.dtd"):
        assert (root / "etc" / "vhostmd" / name).is_file()
    assert (root / "etc" / "systemd" / "system" / "vhostmd.service").is_file()
    for page in ("man8/vhostmd.8", "man5/vhostmd.conf.5", "man1/vm-dump-metrics.1"):
        assert (root / "usr" / "local" / "share" / "man" / page).is_file(), page

    # The venv's own copy, with its built extension: not the clone's sources.
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-I", "-c",
         "import vhostmd_py, vhostmd_py.publish._mdisk, vhostmd_guest; print(vhostmd_py.__file__)"],
        cwd="/", env=_env(), capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert where.startswith(str(venv)), where

    # The installed daemon with the installed config, its disk moved to a temp dir.
    disk = shm_dir / "vhostmd0"
    config = shm_dir / "vhostmd.conf"
    shipped = (root / "etc" / "vhostmd" / "vhostmd.conf").read_text()
    assert "<path>/dev/shm/vhostmd0</path>" in shipped
    config.write_text(shipped.replace("<path>/dev/shm/vhostmd0</path>", f"<path>{disk}</path>"))
    run = subprocess.run(
        [str(venv / "bin" / "vhostmd"), "-d", "--once", "-f", str(config),
         "-c", "test:///default"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "first metrics published" in run.stderr
    doc = etree.fromstring(read_disk(disk, busy_timeout=2))
    values = {(m.findtext("name"), m.get("context")): m.findtext("value") for m in doc}
    assert values[("HostName", "host")] == socket.gethostname()
    assert ("TotalCPUTime", "vm") in values  # test:///default's running domain
    for command, package in (("vhostmdctl", "vhostmd-py"), ("vm-dump-metrics", "vhostmd-py-guest")):
        version = subprocess.run([str(venv / "bin" / command), "--version"], env=_env(),
                                 capture_output=True, text=True, timeout=60, check=True)
        assert version.stdout.startswith(f"{command} ({package}) "), version.stdout


def test_failed_build_removes_the_half_installed_venv(tmp_path: Path) -> None:
    """A build failure (no working C compiler) leaves no venv and no link behind."""
    root = tmp_path / "root"
    env = _env()
    env["CC"] = "false"  # setuptools compiles the cffi extension with $CC
    env["PIP_NO_CACHE_DIR"] = "1"  # a cached wheel of this version would skip the build
    proc = subprocess.run(
        [str(REPO / "scripts" / "install-host"), "--root", str(root), "--no-packages"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode != 0, proc.stderr
    assert "removing the half-installed" in proc.stderr
    assert not (root / "opt" / "vhostmd-py").exists()
    for link in ("sbin/vhostmd", "bin/vhostmdctl", "bin/vm-dump-metrics"):
        assert not (root / "usr" / "local" / link).is_symlink(), link
