"""csrc/runner.c under AddressSanitizer and UndefinedBehaviorSanitizer, driven from C.

csrc/tests/runner_harness.c runs batches with every kind of ending through
vh_run_batch(); built here with -fsanitize=address,undefined (no recovery), a
use after free, a leak, a double close or an overflow in any phase or in the
cleanup path fails the run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import REPO

CSRC = REPO / "csrc"

EXPECTED = [
    "0 1 0 one",  # VH_REAPED, exit 0
    "1 1 3 ",  # exit 3
    "2 3 -1 ",  # VH_REAPED | VH_TIMEOUT
    "3 5 -1 y",  # VH_REAPED | VH_OVERFLOW
    "4 129 0 bg",  # VH_REAPED | VH_LINGERED: the action's own status
    "5 1 -1 ",  # killed its worker: the worker's wait status
    "6 1 0 seven",
    "0 16 -1 ",  # VH_SPAWN_ERROR: no such shell
    "1 16 -1 ",
]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_runner_is_clean_under_asan_and_ubsan(tmp_path: Path) -> None:
    """Every job's ending is the expected one and the sanitizers report nothing."""
    exe = tmp_path / "runner_harness"
    subprocess.run(
        ["gcc", "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-fno-omit-frame-pointer", "-std=c99", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror",
         f"-I{CSRC}", str(CSRC / "tests" / "runner_harness.c"), str(CSRC / "runner.c"),
         "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1")
    proc = subprocess.run([str(exe), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert "Sanitizer" not in proc.stderr and "runtime error" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == EXPECTED
