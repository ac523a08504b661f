"""Process checks shared by the runner and collector tests."""

from __future__ import annotations


def alive(pid: int) -> bool:
    """True when PID exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
