"""The e2e tier's shared pieces: the libvirt system daemon, and the order of the tests.

`libvirtd` (session): makes sure a libvirtd answers on qemu:///system through
scripts/e2e/libvirtd, the one place that starts virtlogd + libvirtd when none
answers and stops, at the end of the session, only what it started. It
installs nothing: where libvirtd is not installed (or we are not root) it
skips with the reason; scripts/e2e-guest's package step installs it.

Order: the tests that use this fixture (test_e2e_accounting.py) run after
test_e2e_guest.py. So on a fresh machine e2e-guest's package step has
installed libvirt before they need it (or e2e-guest skipped with exit 77,
and so do they), and e2e-guest still starts and stops its own libvirtd (the
session's is started only when first asked for, after it), which its
start/stop and interrupted-run checks are about.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator, List

import pytest

REPO = Path(__file__).resolve().parents[2]
HELPER = REPO / "scripts" / "e2e" / "libvirtd"
# After these files, in collection order otherwise.
LAST = ("test_e2e_accounting.py",)


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    """Move the tests of LAST after every other test (a stable sort)."""
    items.sort(key=lambda item: item.path.name in LAST)


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[None]:
    """A libvirtd answering on qemu:///system for the session; skip where it cannot be started."""
    workdir = Path(os.environ.get("VHOSTMD_E2E_WORKDIR", "/var/tmp/vhostmd-e2e"))
    state = workdir / "libvirtd-pytest"
    proc = subprocess.run(["bash", str(HELPER), "start", str(state)],
                          capture_output=True, text=True, timeout=180, check=False)
    reason = (proc.stderr.strip().splitlines() or ["no reason given"])[-1]
    if proc.returncode == 77:
        pytest.skip(f"no libvirtd on qemu:///system: {reason}")
    try:
        assert proc.returncode == 0, f"scripts/e2e/libvirtd start failed:\n{proc.stderr}"
        yield
    finally:
        stop = subprocess.run(["bash", str(HELPER), "stop", str(state)],
                              capture_output=True, text=True, timeout=120, check=False)
        assert stop.returncode == 0, f"scripts/e2e/libvirtd stop failed:\n{stop.stderr}"
