"""docs/INSTALL.md's by-hand recipe, run verbatim from a fresh clone, and the daemon it installs.

The recipe is the fenced block after the line ``<!-- recipe: by-hand -->``;
its PREFIX, ETCDIR, SBINDIR and BINDIR point into a temporary directory
(the defaults are /opt/vhostmd-py, /etc/vhostmd, /usr/local/sbin,
/usr/local/bin). pip builds libvirt-python and the rrdtool binding (the
Debian package list of docs/INSTALL.md must be installed, as
scripts/setup-env does): about a minute, `slow`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict

import pytest
from helpers import REPO
from lxml import etree
from vhostmd_wire.disk import read_disk

pytestmark = pytest.mark.slow

INSTALL_TIMEOUT_S = 900
MARKER = "<!-- recipe: by-hand -->"


def recipe(text: str, marker: str = MARKER) -> str:
    """The fenced block right after the marker line (the marker must be there once)."""
    lines = text.splitlines()
    assert [line.strip() for line in lines].count(marker) == 1, marker
    start = [line.strip() for line in lines].index(marker) + 1
    assert lines[start].startswith("```"), lines[start]
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    return "\n".join(lines[start + 1:end]) + "\n"


def _env() -> Dict[str, str]:
    """The caller's environment without anything that would import the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":")
                           if not p.startswith(str(REPO)))
    return env


def test_recipe_is_extracted_as_written() -> None:
    """The extraction takes the block after the marker, nothing before or after it."""
    text = "intro\n```sh\nnot this\n```\n" + MARKER + "\n```sh\na\nb\n```\n```sh\nnor this\n```\n"
    assert recipe(text) == "a\nb\n"
    assert "pip" in recipe((REPO / "docs" / "INSTALL.md").read_text())


def test_by_hand_recipe_verbatim_then_the_installed_daemon_publishes(
    tmp_path: Path, shm_dir: Path
) -> None:
    """Fresh clone -> the recipe (cwd: the clone) -> the installed vhostmd --once -> its disk."""
    script = recipe((REPO / "docs" / "INSTALL.md").read_text())
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", "--detach", head], check=True)
    # The committed recipe is the one run.
    assert recipe((clone / "docs" / "INSTALL.md").read_text()) == script

    dirs = {"PREFIX": tmp_path / "opt" / "vhostmd-py", "ETCDIR": tmp_path / "etc" / "vhostmd",
            "SBINDIR": tmp_path / "sbin", "BINDIR": tmp_path / "bin"}
    env = _env()
    env.update({name: str(path) for name, path in dirs.items()})
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1].startswith("vhostmd (vhostmd-py) "), proc.stdout[-500:]

    for name in ("vhostmd.conf", "vhostmd.dtd", "metric.dtd"):
        assert (dirs["ETCDIR"] / name).is_file(), name
    vhostmd = dirs["SBINDIR"] / "vhostmd"
    reader = dirs["BINDIR"] / "vm-dump-metrics"
    for command in (vhostmd, dirs["BINDIR"] / "vhostmdctl", reader):
        assert os.readlink(command) == str(dirs["PREFIX"] / "bin" / command.name)

    disk = shm_dir / "vhostmd0"
    config = shm_dir / "vhostmd.conf"
    shipped = (dirs["ETCDIR"] / "vhostmd.conf").read_text()
    assert "<path>/dev/shm/vhostmd0</path>" in shipped
    config.write_text(shipped.replace("<path>/dev/shm/vhostmd0</path>", f"<path>{disk}</path>"))
    run = subprocess.run([str(vhostmd), "-d", "--once", "-f", str(config), "-c", "test:///default"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == 0, run.stderr
    doc = etree.fromstring(read_disk(disk, busy_timeout=2))
    assert ("TotalCPUTime", "vm") in {(m.findtext("name"), m.get("context")) for m in doc}
    read = subprocess.run([str(reader), "--disk", str(disk)], env=_env(), capture_output=True,
                          timeout=60, check=False)
    assert read.returncode == 0, read.stderr
    assert etree.fromstring(read.stdout).findtext("metric/name")
