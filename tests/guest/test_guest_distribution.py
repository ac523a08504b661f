"""The guest distribution on its own: the py3-none-any wheel in a bare venv, and the .pyz.

Built here from ./guest (pip wheel, scripts/build-guest), installed with
--no-deps into a fresh venv that has no lxml, no cffi and no host package,
then run against every golden disk and the golden reader cases; the output
bytes and exit codes must equal those of the in-tree tool, which
tests/guest/test_guest_cli.py checks against upstream.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow

GOLDEN_DISK_DIRS = ("disks", "reader/images")


def _run(cmd: List[str], **kwargs: object) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    return subprocess.run(cmd, capture_output=True, timeout=300, check=False, **kwargs)  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist/ with the wheel and the .pyz, written by scripts/build-guest."""
    out = tmp_path_factory.mktemp("dist")
    proc = _run(
        [str(REPO / "scripts" / "build-guest"), str(out)],
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def bare_venv(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the guest wheel (installed with --no-deps, offline)."""
    venv = tmp_path_factory.mktemp("venv") / "guest"
    proc = _run([sys.executable, "-m", "venv", str(venv)])
    assert proc.returncode == 0, proc.stderr
    wheel = _wheel(built)
    proc = _run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ]
    )
    assert proc.returncode == 0, proc.stderr
    return venv


def _wheel(built: Path) -> Path:
    (wheel,) = built.glob("vhostmd_py_guest-*.whl")
    return wheel


def _golden_disks(upstream: Path) -> List[Path]:
    disks = [p for d in GOLDEN_DISK_DIRS for p in sorted((upstream / d).glob("*.img"))]
    assert len(disks) > 10
    return disks


def _outputs(tool: List[str], disks: List[Path], tmp: Path) -> Dict[str, Tuple[int, bytes]]:
    # Run outside the checkout, so the tree's packages cannot leak into sys.path.
    out = {}
    for disk in disks:
        copy = tmp / disk.name  # a private copy: O_DIRECT on the shared tree is not needed
        shutil.copyfile(disk, copy)
        proc = _run(
            [*tool, "-b", "--disk", str(copy), "--busy-timeout", "0.3"],
            stdin=subprocess.DEVNULL,
            cwd=str(tmp),
        )
        out[f"{disk.parent.name}/{disk.name}"] = (proc.returncode, proc.stdout)
    return out


def _in_tree_tool() -> List[str]:
    return [sys.executable, "-m", "vhostmd_guest"]


def test_wheel_is_pure_and_self_contained(built: Path) -> None:
    """py3-none-any, both packages inside, no compiled file, no host package."""
    wheel = _wheel(built)
    assert wheel.name.endswith("-py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("vhostmd_wire/disk.py") for n in names)
    assert any(n.startswith("vhostmd_guest/cli.py") for n in names)
    assert not any(n.split("/")[0] == "vhostmd_py" for n in names)
    assert not any(n.endswith((".so", ".c", ".pyd")) for n in names)
    metadata = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Requires-Python: >=3.6" in text
    assert "Requires-Dist" not in text


def test_bare_venv_has_only_the_guest(bare_venv: Path) -> None:
    """No lxml, no cffi, no click, no host package, no vhostmd command; both tool names."""
    bindir = bare_venv / "bin"
    assert (bindir / "vm-dump-metrics").exists() and (bindir / "vm_dump_metrics").exists()
    assert not (bindir / "vhostmd").exists()
    code = (
        "import importlib.util as u; "
        "print([m for m in ('lxml', 'cffi', 'click', 'vhostmd_py') if u.find_spec(m)])"
    )
    proc = _run([str(bindir / "python"), "-c", code], cwd=str(bare_venv))
    assert proc.stdout.decode().strip() == "[]", proc.stderr


def test_wheel_reads_every_golden_disk_as_the_tree_does(
    bare_venv: Path, upstream: Path, tmp_path: Path
) -> None:
    """Same bytes and exit codes as the in-tree tool for every golden disk image."""
    disks = _golden_disks(upstream)
    ours = _outputs([str(bare_venv / "bin" / "vm-dump-metrics")], disks, tmp_path)
    tree = _outputs(_in_tree_tool(), disks, tmp_path)
    assert ours == tree
    assert sum(1 for code, _ in ours.values() if code == 0) >= 5


def test_wheel_passes_the_golden_reader_cases(bare_venv: Path) -> None:
    """tests/guest/test_guest_cli.py's upstream cases, run against the wheel's tool."""
    env = {**os.environ, "VM_DUMP_METRICS": str(bare_venv / "bin" / "vm-dump-metrics")}
    proc = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(REPO / "tests" / "guest" / "test_guest_cli.py"),
            "-k",
            "golden_reader_case",
        ],
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout.decode()[-3000:]
    assert b" passed" in proc.stdout


def _interpreters() -> List[str]:
    found = [sys.executable]
    pypy = shutil.which("pypy3")
    if pypy:
        found.append(pypy)
    return found


@pytest.mark.parametrize("interpreter", _interpreters())
def test_pyz_reads_every_golden_disk(
    built: Path, upstream: Path, tmp_path: Path, interpreter: str
) -> None:
    """python3 vm-dump-metrics.pyz -b reads the golden disks as the in-tree tool (and pypy3)."""
    pyz = built / "vm-dump-metrics.pyz"
    disks = _golden_disks(upstream)
    ours = _outputs([interpreter, "-I", str(pyz)], disks, tmp_path)
    tree = _outputs(_in_tree_tool(), disks, tmp_path)
    assert ours == tree
