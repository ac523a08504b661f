"""The copy of the golden data in tests/data matches ../shared/golden and its MANIFEST."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from helpers import DATA, REPO

_LOCAL_GOLDEN = DATA / "golden"
_SHARED_GOLDEN = REPO.parent / "shared" / "golden"


def _manifest(root: Path) -> dict[str, str]:
    entries = {}
    for line in (root / "MANIFEST.txt").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        entries[name.removeprefix("./")] = digest
    return entries


def test_local_copy_matches_manifest() -> None:
    """Every file listed in MANIFEST.txt is in tests/data with the listed sha256."""
    root = _LOCAL_GOLDEN / "upstream"
    entries = _manifest(root)
    assert len(entries) > 100
    for name, digest in entries.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.skipif(
    not (_SHARED_GOLDEN / "upstream").is_dir(), reason="../shared not beside the checkout"
)
def test_local_copy_is_current() -> None:
    """tests/data holds the same golden data as ../shared (re-copy when shared changes)."""
    shared = _manifest(_SHARED_GOLDEN / "upstream")
    local = _manifest(_LOCAL_GOLDEN / "upstream")
    assert shared == local
