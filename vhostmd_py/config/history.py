"""``<history>``: the RRD history of the host and of every VM (present = enabled)."""

from __future__ import annotations

import os

from lxml import etree

from vhostmd_py.config.document import line_of
from vhostmd_py.config.records import DEFAULT_RETENTION, HistoryConfig
from vhostmd_py.config.units import DEFAULT_STATE_DIR, duration_of
from vhostmd_py.errors import ConfigError


def parse_history(globals_: etree._Element, file: str, update_period: int) -> HistoryConfig | None:
    """``<history>``, None when absent."""
    elem = globals_.find("history")
    if elem is None:
        return None
    line = line_of(elem)
    state_dir = str(elem.get("state_dir", DEFAULT_STATE_DIR)).strip()
    if not os.path.isabs(state_dir):
        raise ConfigError(file, f"history state_dir '{state_dir}' is not an absolute path", line)
    retention = DEFAULT_RETENTION
    raw = elem.get("retention")
    if raw is not None:
        retention = duration_of(str(raw), file, line, "history retention")
    publish_raw = str(elem.get("publish", "no")).strip().lower()
    if publish_raw not in ("yes", "no"):
        raise ConfigError(file, f"history publish '{publish_raw}' is not yes or no", line)
    daemon = elem.get("rrdcached")
    daemon = str(daemon).strip() if daemon is not None and str(daemon).strip() else None
    heartbeat = None
    raw = elem.get("heartbeat")
    if raw is not None:
        heartbeat = duration_of(str(raw), file, line, "history heartbeat")
        if heartbeat <= update_period:
            raise ConfigError(
                file,
                f"history heartbeat ({heartbeat} s) must be longer than the update period "
                f"({update_period} s)",
                line,
            )
    return HistoryConfig(
        state_dir=state_dir,
        retention=retention,
        publish=publish_raw == "yes",
        rrdcached=daemon,
        heartbeat=heartbeat,
    )
