"""XenServer perfmon's own alarm configuration, ``<config><variable>...</variable></config>``.

perfmon keeps one such document per object (``other-config:perfmon`` of a VM
or of the host); here it is read from an alarms file (``<alarms
file="perfmon.xml"/>`` whose root is ``<config>``) and, by the per-VM policy,
from a domain's libvirt metadata: :func:`parse_perfmon_config` is the one
reader for both. A variable is read as perfmon's ``VariableConfig`` reads it:

- each child is ``<TAG value="..."/>`` (the first such element below the
  ``<variable>``); a missing one takes perfmon's default for the variable
  and the object (:data:`VM_DEFAULTS`, :data:`HOST_DEFAULTS`); a present one
  without ``value`` is the empty string, as minidom's getAttribute gives it;
- ``alarm_trigger_sense`` "high" means high, anything else low;
- a variable perfmon would refuse (no name, no default it needs, a regex
  that does not compile, an unknown consolidation function, a period or
  level that is not a number) is logged with where it came from and
  skipped; the others are kept (perfmon: "config error", not fatal);
- a name given twice: the last one counts (perfmon replaces the first).

Units are perfmon's: ``cpu_usage`` is a fraction (0.5 = half of the CPUs),
``fs_usage`` a fraction of the filesystem; the data sources are the
``perfmon`` names of vhostmd_py/monitors/inputs.py (``cpuN``, ``vif_N_rx``,
``pif_DEV_tx``, ``vbd_DEV_read``). The resolved variables are the project's
:class:`~vhostmd_py.config.records.VariableConfig` with ``dialect`` perfmon:
the engine then applies perfmon's arithmetic (``sum`` of nothing is 0).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

from lxml import etree

from vhostmd_py.config.records import PERFMON, VARIABLE_FIELDS, VariableConfig
from vhostmd_py.errors import ConfigError
from vhostmd_py.safexml import safe_parser

log = logging.getLogger(__name__)

# perfmon's supported_consolidation_functions.
CONSOLIDATION_FNS = ("sum", "average", "max", "get_percent_fs_usage")
TAGS = VARIABLE_FIELDS
# A document larger than this is refused whole (metadata is untrusted).
MAX_BYTES = 256 * 1024

# perfmon's get_default_variable_config, per object: tag -> {variable or "*": default}.
# The disk and host network regexes also match libvirt's device names (vda,
# sda; enp3s0...): perfmon's own (xvd/hd, eth) are matched by them too.
VM_DEFAULTS: Dict[str, Dict[str, str]] = {
    "consolidation_fn": {"cpu_usage": "average", "fs_usage": "get_percent_fs_usage", "*": "sum"},
    "rrd_regex": {
        "cpu_usage": "cpu[0-9]+",
        "network_usage": "vif_[0-9]+_[rt]x",
        "disk_usage": "vbd_(xvd|hd|vd|sd)[a-z]+_(read|write)",
        "fs_usage": "__DUMMY__",  # matches nothing: the function ignores its input
    },
    "alarm_trigger_period": {"*": "60"},
    "alarm_auto_inhibit_period": {"fs_usage": "604800", "*": "3600"},
    "alarm_trigger_level": {"fs_usage": "0.9"},
    "alarm_trigger_sense": {"*": "high"},
    "alarm_priority": {"*": "5"},
}
HOST_DEFAULTS: Dict[str, Dict[str, str]] = {
    "consolidation_fn": {"cpu_usage": "average", "*": "sum"},
    "rrd_regex": {"cpu_usage": "cpu[0-9]+", "network_usage": "pif_.+_[rt]x"},
    "alarm_trigger_period": {"*": "60"},
    "alarm_auto_inhibit_period": {"*": "3600"},
    "alarm_trigger_sense": {"*": "high"},
    "alarm_priority": {"*": "5"},
}


@dataclass(frozen=True)
class PerfmonConfig:
    """The variables of one perfmon document, and those refused (with perfmon's reason)."""

    variables: Tuple[VariableConfig, ...]
    refused: Tuple[str, ...]


class _Refused(Exception):
    pass


def _default(context: str, name: str, tag: str) -> str:
    table = (HOST_DEFAULTS if context == "host" else VM_DEFAULTS).get(tag, {})
    if name in table:
        return table[name]
    if "*" in table:
        return table["*"]
    what = "alarm_trigger_level" if tag == "alarm_trigger_level" else tag
    raise _Refused(f"variable {name}: no default {what} - please specify one")


def _first(elem: etree._Element, tag: str) -> etree._Element | None:
    for sub in elem.iter(tag):
        if sub is not elem:
            return sub
    return None


def _variable(elem: etree._Element, context: str, where: str) -> VariableConfig:
    name_elem = _first(elem, "name")
    if name_elem is None:
        raise _Refused("variable missing 'name' tag")
    name = str(name_elem.get("value", ""))

    def get(tag: str) -> str:
        found = _first(elem, tag)
        if found is None:
            return _default(context, name, tag)
        return str(found.get("value", ""))

    regex = get("rrd_regex")
    try:
        re.compile(regex)
    except re.error as err:
        raise _Refused(f"variable {name}: regex {regex} does not compile") from err
    consolidation = get("consolidation_fn")
    if consolidation not in CONSOLIDATION_FNS:
        raise _Refused(f"variable {name}: consolidation function {consolidation} not supported")
    numbers: Dict[str, float] = {}
    for tag, kind in (("alarm_trigger_period", int), ("alarm_auto_inhibit_period", int),
                      ("alarm_trigger_level", float), ("alarm_priority", int)):
        raw = get(tag)
        try:
            numbers[tag] = kind(raw.strip())
        except ValueError as err:
            noun = "an int" if kind is int else "a float"
            raise _Refused(f"variable {name}: {tag} {raw} not {noun}") from err
    level = numbers["alarm_trigger_level"]
    if level != level or level in (float("inf"), float("-inf")):
        raise _Refused(f"variable {name}: alarm_trigger_level {level} not a finite float")
    line = elem.sourceline
    return VariableConfig(
        name=name,
        rrd_regex=regex,
        consolidation_fn=consolidation,
        alarm_trigger_level=level,
        alarm_trigger_sense="high" if get("alarm_trigger_sense") == "high" else "low",
        alarm_trigger_period=int(numbers["alarm_trigger_period"]),
        alarm_auto_inhibit_period=int(numbers["alarm_auto_inhibit_period"]),
        alarm_priority=int(numbers["alarm_priority"]),
        dialect=PERFMON,
        where=f"{where}:{line}" if isinstance(line, int) else where,
    )


def parse_perfmon_root(root: etree._Element, *, where: str, context: str = "vm") -> PerfmonConfig:
    """The variables of a parsed perfmon document (every ``<variable>`` in it, as perfmon)."""
    found: Dict[str, VariableConfig] = {}
    refused: List[str] = []
    for elem in root.iter("variable"):
        try:
            var = _variable(elem, context, where)
        except _Refused as why:
            line = elem.sourceline
            at = f"{where}:{line}" if isinstance(line, int) else where
            log.error("%s: perfmon config error, variable skipped: %s", at, why)
            refused.append(f"{at}: {why}")
            continue
        found.pop(var.name, None)  # a later one replaces it, at its own place
        found[var.name] = var
    return PerfmonConfig(tuple(found.values()), tuple(refused))


def parse_perfmon_config(
    xml_bytes: bytes, *, where: str, context: str = "vm"
) -> PerfmonConfig:
    """perfmon's ``<config>`` XML -> its variables for a VM (or the host, CONTEXT "host").

    WHERE names the source in messages (a file, or a domain's metadata). A
    document that is not XML, too large, or whose root is not ``<config>``
    raises ConfigError naming WHERE (the caller decides whether that is fatal);
    single variables perfmon would refuse are logged and left out.
    """
    if context not in ("vm", "host"):
        raise ValueError(f"context {context!r} is neither 'vm' nor 'host'")
    if len(xml_bytes) > MAX_BYTES:
        raise ConfigError(where, f"perfmon config of {len(xml_bytes)} bytes (at most {MAX_BYTES})")
    try:
        root = etree.fromstring(xml_bytes, safe_parser())
    except etree.XMLSyntaxError as err:
        raise ConfigError(where, f"perfmon config: XML syntax error: {err.msg}",
                          err.lineno or None) from err
    if root.getroottree().docinfo.internalDTD is not None:
        # perfmon's documents have none; entities in untrusted metadata are refused.
        raise ConfigError(where, "perfmon config: a DOCTYPE is not allowed")
    if root.tag != "config":
        line = root.sourceline
        raise ConfigError(where, f"perfmon config: root element is <{root.tag}>, "
                          "expected <config>", line if isinstance(line, int) else None)
    return parse_perfmon_root(root, where=where, context=context)
