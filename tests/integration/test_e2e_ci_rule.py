"""tests/e2e/conftest.py's rule, in a pytest of its own: in CI an e2e skip fails, but one.

A copy of the e2e conftest (and the helper it imports) runs two tests, one
skipping for "QEMU cannot run on this machine", one for another reason; with
CI=true the second is a failure and the first stays a skip, printed as a
block; without CI both are skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import REPO

TESTS = '''
import pytest
from helpers.e2e_setup import NO_QEMU

def test_no_qemu():
    pytest.skip(NO_QEMU + ": qemu-system-x86_64 cannot start a TCG machine: test")

def test_not_set_up():
    pytest.skip("e2e not set up here: not root")

def test_runs():
    pass
'''

TOLD_ONCE = '''
import pytest
from helpers.e2e_setup import SetupFailure

@pytest.fixture(scope="module")
def _setup():
    return SetupFailure("the set-up", "=== THE-LONG-REPORT ===")

@pytest.fixture
def setup(_setup, request):
    _setup.fail(request.node.nodeid)

def test_a(setup):
    pass

def test_b(setup):
    pass

def test_c(setup):
    pass
'''


def _run(tmp_path: Path, ci: str | None, tests: str = TESTS) -> subprocess.CompletedProcess[str]:
    tree = tmp_path / ("ci" if ci else "dev")
    (tree / "e2e").mkdir(parents=True)
    (tree / "helpers").mkdir()
    shutil.copy(REPO / "tests" / "e2e" / "conftest.py", tree / "e2e" / "conftest.py")
    shutil.copy(REPO / "tests" / "helpers" / "e2e_setup.py", tree / "helpers" / "e2e_setup.py")
    (tree / "helpers" / "__init__.py").write_text("")
    (tree / "e2e" / "test_rule.py").write_text(tests)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(tree)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "--rootdir", str(tree),
         str(tree / "e2e")],
        capture_output=True, text=True, timeout=120, cwd=tree, env=env, check=False)


def test_in_ci_only_the_no_qemu_skip_is_a_skip(tmp_path: Path) -> None:
    proc = _run(tmp_path, "true")
    assert proc.returncode == 1, proc.stdout
    assert "1 failed, 1 passed, 1 skipped" in proc.stdout, proc.stdout
    assert ("skipped in CI (CI=true), where the e2e tier must run: e2e not set up here"
            in proc.stdout)
    assert "THE REAL-GUEST TESTS DID NOT RUN" in proc.stdout, proc.stdout


def test_outside_ci_both_skip(tmp_path: Path) -> None:
    proc = _run(tmp_path, None)
    assert proc.returncode == 0, proc.stdout
    assert "1 passed, 2 skipped" in proc.stdout, proc.stdout


def test_a_setup_failure_is_reported_once(tmp_path: Path) -> None:
    """Three tests need a failed set-up: the report once, then a one-line pointer each."""
    proc = _run(tmp_path, None, TOLD_ONCE)
    assert "3 errors" in proc.stdout, proc.stdout
    assert proc.stdout.count("THE-LONG-REPORT") == 1, proc.stdout
    assert proc.stdout.count("the set-up failed: reported once, at e2e/test_rule.py::test_a") == 2
