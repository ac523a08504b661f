"""``<alarms>`` -> AlarmsConfig: XenServer perfmon's variables, per host and per VM.

The section is optional and comes after ``<metrics>`` (vhostmd.dtd), so a
config written for upstream vhostmd stays valid against upstream's DTD. It
may instead name a file (``<alarms file="alarms.xml"/>``, relative to the
config's directory) whose root is the same element; that file is validated
against the same grammar and errors name it and its line.

Variables follow XenServer perfmon's fields and defaults (see
docs/man/vhostmd.conf.5): ``name``, ``rrd_regex``, ``consolidation_fn``,
``alarm_trigger_level``, ``alarm_trigger_sense``, ``alarm_trigger_period``,
``alarm_auto_inhibit_period``, ``alarm_priority``. A ``<vm name=|uuid=>``
override changes only the fields it gives; the rest come from the section's
variable of the same name, then from the built-in defaults
(vhostmd_py.config.records.resolve).
"""

from __future__ import annotations

from typing import Any, Dict, List

from lxml import etree

from vhostmd_py.config.document import included, line_of, text_of, vm_selector, yes
from vhostmd_py.config.records import (
    DEFAULT_FS_USAGE_PATH,
    DEFAULT_HISTORY,
    DEFAULT_HOOK_TIMEOUT,
    DEFAULT_JOURNAL_SOCKET,
    VARIABLE_FIELDS,
    AlarmsConfig,
    PartialVariable,
    VariableConfig,
    VmAlarms,
    resolve,
)
from vhostmd_py.config.units import DEFAULT_STATE_DIR
from vhostmd_py.errors import ConfigError

_FIELDS = VARIABLE_FIELDS


def _partial(elem: etree._Element, file: str) -> PartialVariable:
    name = ""
    fields: Dict[str, str] = {}
    for child in elem:
        if not isinstance(child.tag, str):
            continue  # comments, processing instructions
        tag = child.tag
        if tag == "name":
            if name:
                raise ConfigError(file, "<alarm> with more than one <name>", line_of(child))
            name = text_of(child)
        elif tag in _FIELDS:
            if tag in fields:
                raise ConfigError(file, f"<alarm> with more than one <{tag}>", line_of(child))
            fields[tag] = text_of(child)
    if not name:
        raise ConfigError(file, "<alarm> without a <name>", line_of(elem))
    enabled = elem.get("enabled", "yes") == "yes"
    return PartialVariable(name, tuple(fields.items()), enabled, file, line_of(elem))


def _number(elem: etree._Element, attr: str, file: str, default: float, minimum: float) -> float:
    raw = elem.get(attr)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError as err:
        raise ConfigError(file, f"{attr}={raw!r} is not a number", line_of(elem)) from err
    if not value >= minimum:
        raise ConfigError(file, f"{attr}={raw!r} is less than {minimum:g}", line_of(elem))
    return value


def parse_alarms(elem: etree._Element, file: str, grammar: etree.DTD) -> AlarmsConfig:
    """``<alarms>`` (or the file it names) -> AlarmsConfig; every variable checked now."""
    root, where = included(elem, file, grammar, foreign=("config",))
    if root.tag == "config":
        return _perfmon_alarms(elem, root, where, file)
    host: List[VariableConfig] = []
    vm: List[PartialVariable] = []
    overrides: List[VmAlarms] = []
    for child in root:
        if not isinstance(child.tag, str):
            continue
        if child.tag == "alarm":
            var = _partial(child, where)
            target: List[Any] = host if child.get("context", "vm") == "host" else vm
            if any(v.name == var.name for v in target):
                raise ConfigError(where, f"alarm variable {var.name} defined twice", var.line)
            if target is host:
                if var.enabled:
                    host.append(resolve(var, "host"))
            else:
                vm.append(var)
        elif child.tag == "vm":
            uuid, name = vm_selector(child, where)
            variables: List[PartialVariable] = []
            for sub in child:
                if not isinstance(sub.tag, str):
                    continue
                if sub.tag != "alarm":
                    raise ConfigError(
                        where, f"<{sub.tag}> is not allowed in <alarms><vm>", line_of(sub)
                    )
                var = _partial(sub, where)
                if any(v.name == var.name for v in variables):
                    raise ConfigError(where, f"alarm variable {var.name} defined twice", var.line)
                variables.append(var)
            overrides.append(VmAlarms(uuid, name, tuple(variables)))
    config = _delivered(
        root, where,
        host=tuple(host),
        vm=tuple(vm),
        overrides=tuple(overrides),
    )
    # Check every VM default and every override now, with its line, rather
    # than when a matching VM first appears.
    for var in vm:
        resolve(var)
    for over in overrides:
        config.variables_for_vm(over.uuid or "", over.name or "")
    return config


def _fs_path(elem: etree._Element, file: str) -> str:
    path = str(elem.get("fs_usage_path") or DEFAULT_FS_USAGE_PATH)
    if not path.startswith("/"):
        raise ConfigError(file, f"fs_usage_path={path!r} is not an absolute path", line_of(elem))
    return path


def _perfmon_alarms(
    elem: etree._Element, root: etree._Element, where: str, file: str
) -> AlarmsConfig:
    """``<alarms file=...>`` naming a perfmon ``<config>``: its variables for every VM.

    The delivery attributes (state_dir, hook, ...) are those of the
    ``<alarms>`` element itself; perfmon's document has none.
    """
    from vhostmd_py.config.perfmon import parse_perfmon_root

    perfmon = parse_perfmon_root(root, where=where, context="vm")
    return _delivered(elem, file, host=(), vm=(), overrides=(), vm_resolved=perfmon.variables)


def _delivered(elem: etree._Element, file: str, **variables: Any) -> AlarmsConfig:
    """AlarmsConfig: ELEM's delivery attributes (state_dir, hook, ...) and VARIABLES."""
    return AlarmsConfig(
        state_dir=str(elem.get("state_dir") or DEFAULT_STATE_DIR),
        hook=str(elem.get("hook")) if elem.get("hook") else None,
        hook_timeout=_number(elem, "hook_timeout", file, DEFAULT_HOOK_TIMEOUT, 0.1),
        history=int(_number(elem, "history", file, DEFAULT_HISTORY, 1)),
        journal_socket=str(elem.get("journal_socket") or DEFAULT_JOURNAL_SOCKET),
        guest_metrics=yes(elem, "guest_metrics", False),
        fs_usage_path=_fs_path(elem, file),
        **variables,
    )
