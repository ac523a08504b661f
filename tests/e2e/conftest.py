"""The e2e tier's shared pieces: the machine's set-up, a private libvirtd, and CI's rule.

`e2e_machine` (session): scripts/e2e/packages once: the missing Debian
packages installed (never an upgrade), then QEMU must start a TCG machine.
`libvirtd` (per module): a private virtlogd + libvirtd (scripts/e2e/libvirtd),
stopped at the end of the module; its URI.

Skips: the one allowed anywhere is "QEMU cannot run on this machine" (exit
77: apt has no qemu-system-x86, or qemu-system-x86_64 cannot start a TCG
machine), and it is printed as a block at the end of the run. "Not set up
here" (exit 78: not root, or installing would upgrade packages) skips outside
CI. In CI (CI=true) every other skip under tests/e2e is turned into a
failure: the tier must run there.

A set-up failure is reported once, as the scripts print it (the cause and the
end of the log that tells why); every other test that needed it fails with
one line pointing at that report.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator, List

import pytest
from helpers.e2e_setup import NO_QEMU, NOT_HERE, SetupFailure, in_ci, skip_for, workdir

REPO = Path(__file__).resolve().parents[2]
PACKAGES = REPO / "scripts" / "e2e" / "packages"
HELPER = REPO / "scripts" / "e2e" / "libvirtd"
_NO_QEMU_KEY = pytest.StashKey[List[str]]()
_SETUP_KEY = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def e2e_machine(request: pytest.FixtureRequest) -> None:
    """The packages installed and QEMU runnable (scripts/e2e/packages), once per session."""
    proc = subprocess.run(["bash", str(PACKAGES), str(workdir() / "packages")],
                          capture_output=True, text=True, timeout=1200, check=False)
    # What it installed and how to remove it: printed at the end of the run.
    request.config.stash[_SETUP_KEY] = proc.stderr
    skip_for(proc.returncode, proc.stderr)
    if proc.returncode != 0:
        pytest.fail(f"scripts/e2e/packages failed ({proc.returncode}):\n{proc.stderr}",
                    pytrace=False)


@pytest.fixture(scope="module")
def _libvirtd_module(e2e_machine: None) -> Iterator[str | SetupFailure]:
    state = workdir() / "libvirtd-pytest"
    proc = subprocess.run(["bash", str(HELPER), "start", str(state)],
                          capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode == 4:
        skip_for(NOT_HERE, "NOT SET UP: the private libvirt system daemon needs root")
    try:
        if proc.returncode != 0:
            yield SetupFailure("the private libvirtd (scripts/e2e/libvirtd start)", proc.stderr)
        else:
            yield (state / "uri").read_text().strip()
    finally:
        stop = subprocess.run(["bash", str(HELPER), "stop", str(state)],
                              capture_output=True, text=True, timeout=120, check=False)
        assert stop.returncode == 0, f"scripts/e2e/libvirtd stop failed:\n{stop.stderr}"


@pytest.fixture
def libvirtd(_libvirtd_module: str | SetupFailure, request: pytest.FixtureRequest) -> str:
    """The URI of a private libvirtd for the module (qemu:///system?socket=...)."""
    if isinstance(_libvirtd_module, SetupFailure):
        _libvirtd_module.fail(request.node.nodeid)
    assert isinstance(_libvirtd_module, str)
    return _libvirtd_module


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI, a skip under tests/e2e is a failure, except the one for a machine without QEMU."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if reason.startswith("Skipped: "):
        reason = reason[len("Skipped: "):]
    if NO_QEMU in reason:
        item.config.stash.setdefault(_NO_QEMU_KEY, []).append(reason)
        return
    if in_ci():
        report.outcome = "failed"
        report.longrepr = (f"skipped in CI (CI=true), where the e2e tier must run: {reason}\n"
                           f"(the only skip allowed is '{NO_QEMU}')")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """What the e2e set-up installed, and the allowed skip, loud: blocks at the end of the run."""
    setup = terminalreporter.config.stash.get(_SETUP_KEY, "")
    if setup.strip():
        terminalreporter.write_sep("-", "e2e set-up (scripts/e2e/packages)")
        for line in setup.rstrip().splitlines():
            terminalreporter.write_line(line)
    reasons = terminalreporter.config.stash.get(_NO_QEMU_KEY, [])
    if reasons:
        terminalreporter.write_sep("!", "THE REAL-GUEST TESTS DID NOT RUN", red=True, bold=True)
        terminalreporter.write_line(f"{len(reasons)} tests under tests/e2e skipped: {reasons[0]}")
        terminalreporter.write_line("(decided by scripts/e2e/packages: apt has no qemu-system-x86, "
                                    "or qemu-system-x86_64 cannot start a TCG machine)")
