"""Fixtures of the integration tier: the daemon as a real process."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterator, List

import pytest
from helpers.daemon import Vhostmd


@pytest.fixture()
def spawn(tmp_path: Path) -> Iterator[Callable[..., Vhostmd]]:
    """Start `vhostmd` processes that are always killed at the end of the test."""
    started: List[Vhostmd] = []

    def start(*args: str, env: Dict[str, str] | None = None, cwd: Path | None = None,
              own_pid_file: bool = True) -> Vhostmd:
        daemon = Vhostmd(list(args), tmp_path, env=env, cwd=cwd, own_pid_file=own_pid_file)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()
