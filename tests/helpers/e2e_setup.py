"""What the e2e tier's fixtures share: where its state goes, its skips, a failure told once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import pytest

# The prefix of the one skip CI accepts (scripts/e2e/packages, exit 77).
NO_QEMU = "QEMU cannot run on this machine"
# scripts/e2e/packages' and scripts/e2e-guest's "not set up here" status.
NOT_HERE = 78


def in_ci() -> bool:
    """Whether this run is CI's (CI=true, as CI sets it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def workdir() -> Path:
    """The e2e cache and state directory."""
    path = Path(os.environ.get("VHOSTMD_E2E_WORKDIR", "/var/tmp/vhostmd-e2e"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def reason_line(stderr: str, prefix: str) -> str | None:
    """The text after PREFIX on the last stderr line that has it."""
    found = [ln.split(prefix, 1)[1].strip() for ln in stderr.splitlines() if prefix in ln]
    return found[-1] if found else None


def skip_for(returncode: int, stderr: str) -> None:
    """Skip for exit 77 (no QEMU here) or 78 (not set up here); anything else returns."""
    if returncode == 77:
        why = reason_line(stderr, f"SKIP: {NO_QEMU}:") or "no reason given"
        pytest.skip(f"{NO_QEMU}: {why}")
    if returncode == NOT_HERE:
        why = reason_line(stderr, "NOT SET UP:") or "no reason given"
        pytest.skip(f"e2e not set up here: {why}")


@dataclass
class SetupFailure:
    """A set-up that failed: its report, given in full to the first test only."""

    what: str
    report: str
    told: List[str] = field(default_factory=list)

    def fail(self, nodeid: str) -> None:
        """Fail the test NODEID: the whole report the first time, a pointer after."""
        if not self.told:
            self.told.append(nodeid)
            pytest.fail(f"{self.what} failed:\n{self.report}", pytrace=False)
        pytest.fail(f"{self.what} failed: reported once, at {self.told[0]}", pytrace=False)
