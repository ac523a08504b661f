"""What the foreground daemon (-d, as under systemd) tells an operator (docs/OPERATIONS.md, Logs).

Default level: the start-up line and the first successful publish, nothing
else while all is well. -v: one line per cycle (metrics, VMs, duration).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
from helpers import REPO
from helpers.config import write_config

METRICS = [
    ("A", "string", "host", "echo a"),
    ("B", "string", "host", "echo b"),
    ("N", "string", "vm", "echo NAME"),
]


Run = Callable[[List[str], float], List[str]]


@pytest.fixture
def daemon_log(shm_dir: Path) -> Iterator[Run]:
    """Run `vhostmd -d [ARGS]` for SECONDS against test:///default; its stderr lines."""
    procs: List[subprocess.Popen[bytes]] = []

    def run(args: List[str], seconds: float) -> List[str]:
        config = shm_dir / "vhostmd.conf"
        write_config(config, shm_dir / "vhostmd0", METRICS, doctype=False)
        log_path = shm_dir / f"stderr-{len(procs)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from vhostmd_py.cli import main; main()",
                 "-d", "-f", str(config), "-c", "test:///default",
                 "-p", str(shm_dir / f"vhostmd-{len(procs)}.pid"), *args],
                stdout=subprocess.DEVNULL, stderr=log,
                env=dict(os.environ, PYTHONPATH=str(REPO)),
            )
        procs.append(proc)
        time.sleep(seconds)
        assert proc.poll() is None, log_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        return log_path.read_text().splitlines()

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_default_level_says_started_and_first_publish_only(daemon_log: Run, shm_dir: Path) -> None:
    """Over about 3 cycles: exactly the start-up line and the first-publish line."""
    lines = daemon_log([], 3.3)
    assert len(lines) == 2, lines
    started, published = lines
    assert re.fullmatch(
        r"vhostmd: INFO: vhostmd-py \S+ started \(pid \d+\): \S+vhostmd\.conf, 3 metrics, "
        r"every 1 s, transports vbd, disk \S+vhostmd0, libvirt test:///default",
        started,
    ), started
    # test:///default runs one domain, "test": two host metrics + its one.
    assert published == (
        f"vhostmd: INFO: first metrics published on disk {shm_dir / 'vhostmd0'}: 3 metrics, 1 VMs"
    )


def test_verbose_adds_one_line_per_cycle(daemon_log: Run) -> None:
    """-v: a line per cycle with its number, metrics, VMs and duration."""
    lines = daemon_log(["-v"], 3.3)
    cycles = [m for line in lines if (m := re.fullmatch(
        r"vhostmd: INFO: cycle (\d+): 3 metrics, 1 VMs, (\d+\.\d{3}) s", line))]
    assert [int(m.group(1)) for m in cycles] == list(range(1, len(cycles) + 1))
    assert 3 <= len(cycles) <= 5, lines
    assert all(float(m.group(2)) < 1 for m in cycles)
    assert sum("first metrics published" in line for line in lines) == 1
