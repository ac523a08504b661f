"""``<freshness>``: publication time, update period and host identity as host metrics."""

from __future__ import annotations

import os

from lxml import etree

from vhostmd_py.config.document import line_of
from vhostmd_py.config.records import DEFAULT_IDENTITY_KEY, DEFAULT_MACHINE_ID, FreshnessConfig
from vhostmd_py.errors import ConfigError


def parse_freshness(globals_: etree._Element, file: str) -> FreshnessConfig | None:
    """``<freshness>``, None when absent; its paths must be absolute."""
    elem = globals_.find("freshness")
    if elem is None:
        return None
    line = line_of(elem)
    paths = {}
    for attr, default in (("identity_key", DEFAULT_IDENTITY_KEY),
                          ("machine_id", DEFAULT_MACHINE_ID)):
        value = str(elem.get(attr, default)).strip()
        if not os.path.isabs(value):
            raise ConfigError(file, f"freshness {attr} '{value}' is not an absolute path", line)
        paths[attr] = value
    key = paths["identity_key"] if str(elem.get("identity", "yes")) == "yes" else None
    return FreshnessConfig(identity_key=key, machine_id=paths["machine_id"])
