"""The state directory's index: VM UUID -> name and last seen, as JSON, written atomically.

``STATE_DIR/index.json``::

    {"version": 1, "step": 5, "rrdcached": null,
     "vms": {"UUID": {"name": "web1", "last_seen": 1700000000.0}, ...}}

Written as: temporary file, fsync, rename over the old one, fsync the
directory; a kill -9 at any point leaves the old or the new index, never a
mix. ``step`` and ``rrdcached`` tell vhostmdctl how the daemon writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping

from vhostmd_py.errors import StrPath
from vhostmd_py.fs import read_bytes, write_atomic
from vhostmd_py.history.errors import HistoryError

INDEX_NAME = "index.json"
VERSION = 1


@dataclass(frozen=True)
class VmEntry:
    """One VM the history has seen."""

    name: str
    last_seen: float  # wall clock, seconds since the epoch


@dataclass(frozen=True)
class Index:
    """The whole index."""

    vms: Mapping[str, VmEntry] = field(default_factory=dict)
    step: int | None = None
    rrdcached: str | None = None

    def to_json(self) -> bytes:
        """Canonical JSON bytes."""
        doc: Dict[str, Any] = {
            "version": VERSION,
            "step": self.step,
            "rrdcached": self.rrdcached,
            "vms": {
                uuid: {"name": e.name, "last_seen": round(e.last_seen, 3)}
                for uuid, e in sorted(self.vms.items())
            },
        }
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8")


def index_path(state_dir: StrPath) -> str:
    """Where the index of a state directory lives."""
    return os.path.join(os.fspath(state_dir), INDEX_NAME)


def read_index(state_dir: StrPath) -> Index:
    """The index, or an empty one when there is none yet (HistoryError if unreadable)."""
    path = index_path(state_dir)
    raw = read_bytes(path, HistoryError)
    if raw is None:
        return Index()
    try:
        doc = json.loads(raw)
        vms = {
            str(uuid): VmEntry(str(e["name"]), float(e["last_seen"]))
            for uuid, e in doc["vms"].items()
        }
        step = doc.get("step")
        daemon = doc.get("rrdcached")
        return Index(vms, int(step) if step is not None else None, str(daemon) if daemon else None)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise HistoryError(path, f"not a valid index: {err}") from err


def write_index(state_dir: StrPath, index: Index) -> None:
    """Replace the index atomically (vhostmd_py.fs.write_atomic); HistoryError on failure."""
    write_atomic(index_path(state_dir), index.to_json(), kind=HistoryError, make_parent=False)
