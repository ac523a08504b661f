"""Helpers shared by the test tiers (host, integration, e2e): import them from here,
never from another test module."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
DATA = REPO / "tests" / "data"
