"""Shared fixtures: where the golden data lives, temporary trees."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List

import pytest

if TYPE_CHECKING:
    # helpers.daemon needs lxml, which the pypy3 guest tier does not have:
    # imported where a test spawns the daemon, not when the guest tests load.
    from helpers.daemon import Vhostmd

REPO = Path(__file__).resolve().parent.parent
_SHARED_GOLDEN = REPO.parent / "shared" / "golden"
_LOCAL_GOLDEN = Path(__file__).resolve().parent / "data" / "golden"


def golden_root() -> Path:
    """The golden data: ../shared/golden when present (CI), else our copy in tests/data."""
    if (_SHARED_GOLDEN / "upstream" / "FACTS.md").is_file():
        return _SHARED_GOLDEN
    return _LOCAL_GOLDEN


@pytest.fixture(scope="session")
def golden() -> Path:
    """Root of the golden data (has upstream/ and reference-configs/)."""
    return golden_root()


@pytest.fixture(scope="session")
def upstream(golden: Path) -> Path:
    """The upstream observations directory (FACTS.md, disks/, reader/, virtio/ ...)."""
    return golden / "upstream"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root directory."""
    return REPO


@pytest.fixture
def shm_dir(tmp_path: Path) -> Iterator[Path]:
    """A private directory on /dev/shm (where the daemon's disk lives), else tmp_path."""
    base = Path("/dev/shm")
    if not (base.is_dir() and os.access(base, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="vhostmd-py-test-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture()
def spawn(tmp_path: Path) -> Iterator[Callable[..., Vhostmd]]:
    """Start `vhostmd` processes that are always killed at the end of the test."""
    from helpers.daemon import Vhostmd

    started: List[Vhostmd] = []

    def start(*args: str, env: Dict[str, str] | None = None, cwd: Path | None = None,
              own_pid_file: bool = True) -> Vhostmd:
        daemon = Vhostmd(list(args), tmp_path, env=env, cwd=cwd, own_pid_file=own_pid_file)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()


_TIER_OF_FOLDER = {"integration": "integration", "e2e": "e2e"}


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    """Every test under tests/integration/ is `integration`, under tests/e2e/ `e2e`.

    The tiers follow the layout, so a test added there can never slip into
    the fast tier (`-m "not slow and not integration and not e2e"`).
    """
    root = Path(__file__).resolve().parent
    for item in items:
        try:
            folder = Path(str(item.fspath)).resolve().relative_to(root).parts[0]
        except ValueError:
            continue
        marker = _TIER_OF_FOLDER.get(folder)
        if marker is not None and item.get_closest_marker(marker) is None:
            item.add_marker(getattr(pytest.mark, marker))
