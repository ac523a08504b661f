"""Configs with the vhostmd-py extensions (per-VM disks, freshness)."""

from __future__ import annotations

from pathlib import Path

from helpers.config import write_config

METRICS = [
    ("HostTag", "string", "host", "echo host-tag"),
    ("Ident", "string", "vm", "echo NAME-VMID-UUID"),
]


def write_conf(tmp: Path, extra: str) -> Path:
    """A config with a shared disk in TMP and EXTRA in <globals> (on line 13)."""
    return write_config(tmp / "vhostmd.conf", tmp / "vhostmd0", METRICS, extra=extra)
