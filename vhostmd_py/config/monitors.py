"""The ``<alarms>`` and ``<accounting>`` sections of vhostmd.conf -> frozen records.

Both sections are optional and come after ``<metrics>`` (vhostmd.dtd), so a
config written for upstream vhostmd stays valid against upstream's DTD. Either
may instead name a file (``<alarms file="alarms.xml"/>``, relative to the
config's directory) whose root is the same element; that file is validated
against the same grammar and errors name it and its line.

Variables follow XenServer perfmon's fields and defaults (see
docs/man/vhostmd.conf.5): ``name``, ``rrd_regex``, ``consolidation_fn``,
``alarm_trigger_level``, ``alarm_trigger_sense``, ``alarm_trigger_period``,
``alarm_auto_inhibit_period``, ``alarm_priority``. A ``<vm name=|uuid=>``
override changes only the fields it gives; the rest come from the section's
variable of the same name, then from the built-in defaults.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from lxml import etree

from vhostmd_py.errors import ConfigError
from vhostmd_py.safexml import safe_parser

DEFAULT_STATE_DIR = "/var/lib/vhostmd"
DEFAULT_JOURNAL_SOCKET = "/run/systemd/journal/socket"
DEFAULT_HOOK_TIMEOUT = 10.0
DEFAULT_HISTORY = 200
DEFAULT_PERIOD = 86400  # bwmon's: one day
# perfmon's fs_usage read "df /etc/passwd": the root filesystem.
DEFAULT_FS_USAGE_PATH = "/"

# perfmon's defaults for every variable.
DEFAULT_TRIGGER_PERIOD = 60
DEFAULT_INHIBIT_PERIOD = 3600
DEFAULT_PRIORITY = 5
CONSOLIDATION_FNS = ("sum", "average", "max", "min")
# The dialect of a variable written in perfmon's own <config> format
# (perfmon.py): perfmon's units, defaults and arithmetic.
PERFMON = "perfmon"
SENSES = ("high", "low")

# Built-in per-variable defaults (perfmon's get_default_variable_config, for
# our data-source names, vhostmd_py/datasources.py): (rrd_regex, consolidation, sense).
BUILTIN_VARIABLES: Dict[str, Tuple[str, str, str]] = {
    "cpu_usage": (r"^cpu_usage$", "average", "high"),
    "memory_free_kib": (r"^memory_free_kib$", "sum", "low"),
    "network_usage": (r"^vif_.+_[rt]x$", "sum", "high"),  # the host's: HOST_NETWORK_REGEX
    "disk_usage": (r"^vbd_.+_(read|write)$", "sum", "high"),
}

# The host has physical interfaces, not VM ones (vhostmd_py/monitors/inputs.py).
HOST_NETWORK_REGEX = r"^pif_.+_[rt]x$"

_FIELDS = (
    "rrd_regex",
    "consolidation_fn",
    "alarm_trigger_level",
    "alarm_trigger_sense",
    "alarm_trigger_period",
    "alarm_auto_inhibit_period",
    "alarm_priority",
)


@dataclass(frozen=True)
class VariableConfig:
    """One alarm variable, fully resolved (what a VariableState runs on)."""

    name: str
    rrd_regex: str
    consolidation_fn: str  # one of CONSOLIDATION_FNS
    alarm_trigger_level: float
    alarm_trigger_sense: str  # "high" | "low"
    alarm_trigger_period: int  # seconds the level must be bad before an alarm
    alarm_auto_inhibit_period: int  # seconds without a second alarm after one
    alarm_priority: int
    # "" for our <alarm> format, PERFMON for perfmon's <config> (units, arithmetic).
    dialect: str = ""
    # Where it was configured: for messages only, never part of "changed?".
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class PartialVariable:
    """A ``<alarm>`` as written: only the fields it gives (None = inherited)."""

    name: str
    fields: Tuple[Tuple[str, str], ...]  # (field name, text) as written
    enabled: bool
    file: str
    line: int | None


@dataclass(frozen=True)
class VmAlarms:
    """Per-VM overrides of alarm variables, selected by uuid or name."""

    uuid: str | None
    name: str | None
    variables: Tuple[PartialVariable, ...]


@dataclass(frozen=True)
class AlarmsConfig:
    """The ``<alarms>`` section."""

    state_dir: str
    hook: str | None
    hook_timeout: float
    history: int
    journal_socket: str
    guest_metrics: bool
    host: Tuple[VariableConfig, ...]
    vm: Tuple[PartialVariable, ...]  # defaults for every VM, resolved per VM
    overrides: Tuple[VmAlarms, ...]
    # Every VM's variables given resolved: perfmon's format (config/perfmon.py).
    vm_resolved: Tuple[VariableConfig, ...] = ()
    # The filesystem perfmon's get_percent_fs_usage (fs_usage) watches.
    fs_usage_path: str = DEFAULT_FS_USAGE_PATH

    def variables_for_vm(self, uuid: str, name: str) -> Tuple[VariableConfig, ...]:
        """The variables watched on one VM: defaults merged with its override, if any."""
        override = _select(self.overrides, uuid, name)
        merged: Dict[str, PartialVariable] = {v.name: v for v in self.vm}
        order = [v.name for v in self.vm]
        if override is not None:
            for var in override.variables:
                base = merged.get(var.name)
                if base is None:
                    order.append(var.name)
                    merged[var.name] = var
                else:
                    fields = dict(base.fields)
                    fields.update(var.fields)
                    merged[var.name] = PartialVariable(
                        var.name, tuple(fields.items()), var.enabled, var.file, var.line
                    )
        out = list(self.vm_resolved)
        for vname in order:
            var = merged[vname]
            if var.enabled:
                # Validated at load time (resolve_all), so this cannot raise.
                out.append(resolve(var))
        return tuple(out)


@dataclass(frozen=True)
class Budget:
    """A period's byte budget; None = no budget in that direction."""

    tx: int | None = None  # bytes the VM may send per period
    rx: int | None = None  # bytes the VM may receive per period
    enforce: bool = False  # cap the outbound rate once tx is spent


@dataclass(frozen=True)
class VmBudget:
    """A per-VM budget override (attributes it gives replace the default's)."""

    uuid: str | None
    name: str | None
    tx: int | None
    rx: int | None
    enforce: bool | None
    clear_tx: bool = False
    clear_rx: bool = False


@dataclass(frozen=True)
class AccountingConfig:
    """The ``<accounting>`` section."""

    period: int  # seconds
    period_offset: int  # periods start at epoch + offset + k * period
    state_dir: str
    guest_metrics: bool
    budget: Budget
    overrides: Tuple[VmBudget, ...]

    def budget_for(self, uuid: str, name: str) -> Budget:
        """The budget of one VM: the default with its override applied."""
        over = _select(self.overrides, uuid, name)
        base = self.budget
        if over is None:
            return base
        tx = None if over.clear_tx else (over.tx if over.tx is not None else base.tx)
        rx = None if over.clear_rx else (over.rx if over.rx is not None else base.rx)
        enforce = over.enforce if over.enforce is not None else base.enforce
        return Budget(tx, rx, enforce)


def _select(items: Tuple[Any, ...], uuid: str, name: str) -> Any:
    # A uuid match wins over a name match: names can be reused, uuids not.
    for item in items:
        if item.uuid is not None and item.uuid.lower() == uuid.lower():
            return item
    for item in items:
        if item.uuid is None and item.name is not None and item.name == name:
            return item
    return None


# --- parsing -------------------------------------------------------------------


def _line(elem: etree._Element) -> int | None:
    line = elem.sourceline
    return line if isinstance(line, int) else None


def _text(elem: etree._Element) -> str:
    return str(elem.xpath("string()")).strip()


def resolve(var: PartialVariable, context: str = "vm") -> VariableConfig:
    """Apply built-in defaults to a written variable; ConfigError at its line when invalid."""
    given = dict(var.fields)
    builtin = BUILTIN_VARIABLES.get(var.name)
    if builtin is not None and context == "host" and var.name == "network_usage":
        builtin = (HOST_NETWORK_REGEX, *builtin[1:])

    def fail(reason: str) -> ConfigError:
        return ConfigError(var.file, f"alarm variable {var.name}: {reason}", var.line)

    regex = given.get("rrd_regex") or (builtin[0] if builtin else "^" + re.escape(var.name) + "$")
    try:
        re.compile(regex)
    except re.error as err:
        raise fail(f"rrd_regex {regex!r} does not compile: {err}") from err
    consolidation = given.get("consolidation_fn") or (builtin[1] if builtin else "sum")
    if consolidation not in CONSOLIDATION_FNS:
        raise fail(
            f"consolidation_fn {consolidation!r} not supported "
            f"(one of {', '.join(CONSOLIDATION_FNS)})"
        )
    sense = given.get("alarm_trigger_sense") or (builtin[2] if builtin else "high")
    if sense not in SENSES:
        raise fail(f"alarm_trigger_sense {sense!r} is neither 'high' nor 'low'")
    raw_level = given.get("alarm_trigger_level")
    if raw_level is None:
        raise fail("no alarm_trigger_level (it has no default)")
    try:
        level = float(raw_level)
    except ValueError as err:
        raise fail(f"alarm_trigger_level {raw_level!r} is not a number") from err
    if level != level or level in (float("inf"), float("-inf")):
        raise fail(f"alarm_trigger_level {raw_level!r} is not a finite number")

    def integer(key: str, default: int, minimum: int) -> int:
        raw = given.get(key)
        if raw is None:
            return default
        try:
            value = int(raw, 10)
        except ValueError as err:
            raise fail(f"{key} {raw!r} is not an integer") from err
        if value < minimum:
            raise fail(f"{key} {value} is less than {minimum}")
        return value

    return VariableConfig(
        name=var.name,
        rrd_regex=regex,
        consolidation_fn=consolidation,
        alarm_trigger_level=level,
        alarm_trigger_sense=sense,
        alarm_trigger_period=integer("alarm_trigger_period", DEFAULT_TRIGGER_PERIOD, 1),
        alarm_auto_inhibit_period=integer("alarm_auto_inhibit_period", DEFAULT_INHIBIT_PERIOD, 0),
        alarm_priority=integer("alarm_priority", DEFAULT_PRIORITY, 0),
        where=f"{var.file}:{var.line}",
    )


def _partial(elem: etree._Element, file: str) -> PartialVariable:
    name = ""
    fields: Dict[str, str] = {}
    for child in elem:
        if not isinstance(child.tag, str):
            continue  # comments, processing instructions
        tag = child.tag
        if tag == "name":
            if name:
                raise ConfigError(file, "<alarm> with more than one <name>", _line(child))
            name = _text(child)
        elif tag in _FIELDS:
            if tag in fields:
                raise ConfigError(file, f"<alarm> with more than one <{tag}>", _line(child))
            fields[tag] = _text(child)
    if not name:
        raise ConfigError(file, "<alarm> without a <name>", _line(elem))
    enabled = elem.get("enabled", "yes") == "yes"
    return PartialVariable(name, tuple(fields.items()), enabled, file, _line(elem))


def _vm_selector(elem: etree._Element, file: str) -> Tuple[str | None, str | None]:
    uuid, name = elem.get("uuid"), elem.get("name")
    if not uuid and not name:
        raise ConfigError(file, "<vm> needs a name or a uuid attribute", _line(elem))
    return (str(uuid) if uuid else None, str(name) if name else None)


def _included(
    elem: etree._Element, file: str, grammar: etree.DTD
) -> Tuple[etree._Element, str]:
    """The element itself, or the root of the file its ``file`` attribute names."""
    ref = elem.get("file")
    if ref is None:
        return elem, file
    if len(elem):
        raise ConfigError(file, f"<{elem.tag} file=...> must be empty", _line(elem))
    path = os.path.join(os.path.dirname(os.path.abspath(file)), str(ref))
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise ConfigError(
            file, f"cannot read {elem.tag} file {path}: {err.strerror or err}", _line(elem)
        ) from err
    try:
        root = etree.fromstring(data, safe_parser())
    except etree.XMLSyntaxError as err:
        raise ConfigError(path, f"XML syntax error: {err.msg}", err.lineno or None) from err
    if elem.tag == "alarms" and root.tag == "config":
        return root, path  # perfmon's own format (config/perfmon.py)
    if root.tag != elem.tag:
        raise ConfigError(path, f"root element is <{root.tag}>, expected <{elem.tag}>", _line(root))
    if root.get("file") is not None:
        raise ConfigError(path, f"an included <{elem.tag}> cannot name another file", _line(root))
    if not grammar.validate(root):
        from vhostmd_py.config import _dtd_error

        # The same wording and ordering (unknown element first) as the main file.
        raise _dtd_error(path, [*grammar.error_log])  # type: ignore[misc]
    return root, path


def _yes(elem: etree._Element, attr: str, default: bool) -> bool:
    raw = elem.get(attr)
    return default if raw is None else raw == "yes"


def _number(elem: etree._Element, attr: str, file: str, default: float, minimum: float) -> float:
    raw = elem.get(attr)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError as err:
        raise ConfigError(file, f"{attr}={raw!r} is not a number", _line(elem)) from err
    if not value >= minimum:
        raise ConfigError(file, f"{attr}={raw!r} is less than {minimum:g}", _line(elem))
    return value


def parse_alarms(elem: etree._Element, file: str, grammar: etree.DTD) -> AlarmsConfig:
    """``<alarms>`` (or the file it names) -> AlarmsConfig; every variable checked now."""
    root, where = _included(elem, file, grammar)
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
            uuid, name = _vm_selector(child, where)
            variables: List[PartialVariable] = []
            for sub in child:
                if not isinstance(sub.tag, str):
                    continue
                if sub.tag != "alarm":
                    raise ConfigError(
                        where, f"<{sub.tag}> is not allowed in <alarms><vm>", _line(sub)
                    )
                var = _partial(sub, where)
                if any(v.name == var.name for v in variables):
                    raise ConfigError(where, f"alarm variable {var.name} defined twice", var.line)
                variables.append(var)
            overrides.append(VmAlarms(uuid, name, tuple(variables)))
    config = AlarmsConfig(
        state_dir=str(root.get("state_dir") or DEFAULT_STATE_DIR),
        hook=str(root.get("hook")) if root.get("hook") else None,
        hook_timeout=_number(root, "hook_timeout", where, DEFAULT_HOOK_TIMEOUT, 0.1),
        history=int(_number(root, "history", where, DEFAULT_HISTORY, 1)),
        journal_socket=str(root.get("journal_socket") or DEFAULT_JOURNAL_SOCKET),
        guest_metrics=_yes(root, "guest_metrics", False),
        host=tuple(host),
        vm=tuple(vm),
        overrides=tuple(overrides),
        fs_usage_path=_fs_path(root, where),
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
        raise ConfigError(file, f"fs_usage_path={path!r} is not an absolute path", _line(elem))
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
    return AlarmsConfig(
        state_dir=str(elem.get("state_dir") or DEFAULT_STATE_DIR),
        hook=str(elem.get("hook")) if elem.get("hook") else None,
        hook_timeout=_number(elem, "hook_timeout", file, DEFAULT_HOOK_TIMEOUT, 0.1),
        history=int(_number(elem, "history", file, DEFAULT_HISTORY, 1)),
        journal_socket=str(elem.get("journal_socket") or DEFAULT_JOURNAL_SOCKET),
        guest_metrics=_yes(elem, "guest_metrics", False),
        host=(),
        vm=(),
        overrides=(),
        vm_resolved=perfmon.variables,
        fs_usage_path=_fs_path(elem, file),
    )


_SIZE = re.compile(r"^(\d+)\s*([kKmMgGtT]?)(i?B)?$")
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_DURATION = re.compile(r"^(\d+)\s*([smhd]?)$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(raw: str, file: str, line: int | None, what: str) -> int:
    """``10G``, ``512M``, ``1024`` (bytes; k/M/G/T are powers of 1024) -> bytes."""
    match = _SIZE.match(raw.strip())
    if match is None:
        raise ConfigError(file, f"{what}={raw!r} is not a size (e.g. 1048576, 512M, 10G)", line)
    return int(match.group(1)) * int(1024 ** _POWERS[match.group(2).lower()])


def parse_duration(raw: str, file: str, line: int | None, what: str) -> int:
    """``86400``, ``1d``, ``12h``, ``30m`` -> seconds."""
    match = _DURATION.match(raw.strip())
    if match is None:
        raise ConfigError(file, f"{what}={raw!r} is not a duration (e.g. 86400, 1d, 12h)", line)
    return int(match.group(1)) * _SECONDS[match.group(2)]


def _budget_attrs(
    elem: etree._Element, file: str
) -> Tuple[int | None, int | None, bool | None, bool, bool]:
    values: List[int | None] = []
    clears: List[bool] = []
    for attr in ("tx", "rx"):
        raw = elem.get(attr)
        if raw is not None and raw.strip() == "none":
            values.append(None)
            clears.append(True)
        else:
            values.append(None if raw is None else parse_size(str(raw), file, _line(elem), attr))
            clears.append(False)
    enforce = None if elem.get("enforce") is None else elem.get("enforce") == "yes"
    return values[0], values[1], enforce, clears[0], clears[1]


def parse_accounting(elem: etree._Element, file: str, grammar: etree.DTD) -> AccountingConfig:
    """``<accounting>`` (or the file it names) -> AccountingConfig."""
    root, where = _included(elem, file, grammar)
    period = DEFAULT_PERIOD
    if root.get("period") is not None:
        period = parse_duration(str(root.get("period")), where, _line(root), "period")
        if period < 1:
            raise ConfigError(where, "period must be at least 1 second", _line(root))
    offset = 0
    if root.get("period_offset") is not None:
        offset = parse_duration(str(root.get("period_offset")), where, _line(root), "period_offset")
    budget = Budget()
    overrides: List[VmBudget] = []
    seen_default = False
    for child in root:
        if not isinstance(child.tag, str):
            continue
        if child.tag == "budget":
            if seen_default:
                raise ConfigError(where, "more than one default <budget>", _line(child))
            seen_default = True
            tx, rx, enforce, _, _ = _budget_attrs(child, where)
            budget = Budget(tx, rx, bool(enforce))
        elif child.tag == "vm":
            uuid, name = _vm_selector(child, where)
            subs = [s for s in child if isinstance(s.tag, str)]
            if len(subs) != 1 or subs[0].tag != "budget":
                raise ConfigError(
                    where, "<accounting><vm> must hold exactly one <budget>", _line(child)
                )
            tx, rx, enforce, clear_tx, clear_rx = _budget_attrs(subs[0], where)
            overrides.append(VmBudget(uuid, name, tx, rx, enforce, clear_tx, clear_rx))
    return AccountingConfig(
        period=period,
        period_offset=offset % period,
        state_dir=str(root.get("state_dir") or DEFAULT_STATE_DIR),
        guest_metrics=_yes(root, "guest_metrics", False),
        budget=budget,
        overrides=tuple(overrides),
    )
