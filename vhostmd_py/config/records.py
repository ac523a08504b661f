"""What a loaded vhostmd.conf is: frozen records, one per section, and Config over them.

Nothing here reads XML: the section parsers (vhostmd_py.config.metrics,
.transports, .disk, .history, .endpoint, .freshness, .alarms, .accounting)
build these records and vhostmd_py.config.load assembles Config. The one
piece of logic kept with a record is what belongs to its meaning: an alarm
variable as written resolved against perfmon's defaults (``resolve``), the
per-VM selection of alarm variables and of budgets.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

from vhostmd_py.config.units import DEFAULT_STATE_DIR, parse_duration
from vhostmd_py.errors import ConfigError

# PATH of actions when the config's <path> is empty (upstream's default config).
DEFAULT_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"


@dataclass(frozen=True)
class Variable:
    """One variable of a ``group`` metric (its value is the n-th output token)."""

    name: str
    type: str


@dataclass(frozen=True)
class MetricSpec:
    """One ``<metric>`` of the config."""

    name: str
    type: str  # one of METRIC_TYPES, "group" or "xml"
    context: str  # "host" | "vm"
    action: str  # element text, leading/trailing whitespace stripped
    unit: str | None  # None when absent or empty (rendered only if non-empty)
    variables: Tuple[Variable, ...] = ()
    # A built-in source field (vhostmd_py.sources.builtin.catalogue) instead of a
    # shell action (then action is ""), from <source>FIELD</source>.
    source: str | None = None


@dataclass(frozen=True)
class VirtioConfig:
    """``<globals><virtio>`` with defaults applied."""

    channel_path: str
    max_channels: int
    expiration_time: int  # effective: max(configured, 3 * update_period), as upstream


DEFAULT_RETENTION = 7 * 86400


@dataclass(frozen=True)
class HistoryConfig:
    """``<globals><history>``: the RRD history (present = enabled)."""

    state_dir: str = DEFAULT_STATE_DIR
    retention: int = DEFAULT_RETENTION  # seconds a gone VM's files are kept
    publish: bool = False  # consolidated values as metrics for the guests
    rrdcached: str | None = None  # rrdcached address (unix:/path or host:port)
    heartbeat: int | None = None  # seconds; None: 2 * update_period (at least 10)

    def effective_heartbeat(self, update_period: int) -> int:
        """The heartbeat in force for this update period."""
        if self.heartbeat is not None:
            return self.heartbeat
        return max(2 * update_period, 10)


DEFAULT_ENDPOINT_ADDRESS = "127.0.0.1"
DEFAULT_ENDPOINT_PORT = 9178


@dataclass(frozen=True)
class EndpointConfig:
    """``<globals><metrics_endpoint>``: the OpenMetrics endpoint (present = enabled)."""

    address: str = DEFAULT_ENDPOINT_ADDRESS  # an IP literal; loopback unless allow_remote
    port: int = DEFAULT_ENDPOINT_PORT  # 0: any free port (logged)
    allow_remote: bool = False


DEFAULT_IDENTITY_KEY = "/var/lib/vhostmd/identity.key"
DEFAULT_MACHINE_ID = "/etc/machine-id"
# The one substitution of a per-VM disk path: the VM's UUID (never its name:
# a name is chosen by whoever defines the domain and must never reach a path).
PERVM_UUID_TOKEN = "%u"


@dataclass(frozen=True)
class PerVmDiskConfig:
    """``<globals><disk_per_vm>``: one metrics disk per running VM (present = enabled)."""

    path: str  # absolute pattern with exactly one %u, in its last component
    size: int  # bytes
    grace: int  # seconds a gone VM's disk is kept before it is removed

    def path_for(self, uuid: str) -> str:
        """The disk path of the VM with this UUID (the caller checked the UUID's form)."""
        return self.path.replace(PERVM_UUID_TOKEN, uuid)

    @property
    def directory(self) -> str:
        """The directory holding every per-VM disk."""
        return os.path.dirname(self.path)


@dataclass(frozen=True)
class FreshnessConfig:
    """``<globals><freshness>``: PublicationTime, UpdatePeriod and HostIdentity host metrics."""

    identity_key: str | None = DEFAULT_IDENTITY_KEY  # None: no HostIdentity (identity="no")
    machine_id: str = DEFAULT_MACHINE_ID


# --- <alarms> -----------------------------------------------------------------------

DEFAULT_JOURNAL_SOCKET = "/run/systemd/journal/socket"
DEFAULT_HOOK_TIMEOUT = 10.0
DEFAULT_HISTORY = 200
# perfmon's fs_usage read "df /etc/passwd": the root filesystem.
DEFAULT_FS_USAGE_PATH = "/"

# perfmon's defaults for every variable.
DEFAULT_TRIGGER_PERIOD = 60
DEFAULT_INHIBIT_PERIOD = 3600
DEFAULT_PRIORITY = 5
CONSOLIDATION_FNS = ("sum", "average", "max", "min")
# A variable's settings, as both formats name them (ours and perfmon's <config>).
VARIABLE_FIELDS = (
    "rrd_regex",
    "consolidation_fn",
    "alarm_trigger_level",
    "alarm_trigger_sense",
    "alarm_trigger_period",
    "alarm_auto_inhibit_period",
    "alarm_priority",
)
# The dialect of a variable written in perfmon's own <config> format
# (perfmon.py): perfmon's units, defaults and arithmetic.
PERFMON = "perfmon"
SENSES = ("high", "low")

# Built-in per-variable defaults (perfmon's get_default_variable_config, for
# our data-source names, vhostmd_py/monitors/inputs.py): (rrd_regex, consolidation, sense).
BUILTIN_VARIABLES: Dict[str, Tuple[str, str, str]] = {
    "cpu_usage": (r"^cpu_usage$", "average", "high"),
    "memory_free_kib": (r"^memory_free_kib$", "sum", "low"),
    "network_usage": (r"^vif_.+_[rt]x$", "sum", "high"),  # the host's: HOST_NETWORK_REGEX
    "disk_usage": (r"^vbd_.+_(read|write)$", "sum", "high"),
}

# The host has physical interfaces, not VM ones (vhostmd_py/monitors/inputs.py).
HOST_NETWORK_REGEX = r"^pif_.+_[rt]x$"


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
                # Validated at load time (parse_alarms), so this cannot raise.
                out.append(resolve(var))
        return tuple(out)


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

    def integer(key: str, default: int, minimum: int, duration: bool = False) -> int:
        raw = given.get(key)
        if raw is None:
            return default
        try:
            value = int(raw, 10)
        except ValueError as err:
            if not duration:
                raise fail(f"{key} {raw!r} is not an integer") from err
            # perfmon writes seconds; "5m" or "1w" read as everywhere else in the file.
            try:
                value = parse_duration(raw)
            except ValueError:
                raise fail(f"{key} {raw!r} is not an integer or a duration") from err
        if value < minimum:
            raise fail(f"{key} {value} is less than {minimum}")
        return value

    return VariableConfig(
        name=var.name,
        rrd_regex=regex,
        consolidation_fn=consolidation,
        alarm_trigger_level=level,
        alarm_trigger_sense=sense,
        alarm_trigger_period=integer("alarm_trigger_period", DEFAULT_TRIGGER_PERIOD, 1, True),
        alarm_auto_inhibit_period=integer(
            "alarm_auto_inhibit_period", DEFAULT_INHIBIT_PERIOD, 0, True
        ),
        alarm_priority=integer("alarm_priority", DEFAULT_PRIORITY, 0),
        where=f"{var.file}:{var.line}",
    )


# --- <accounting> -------------------------------------------------------------------

DEFAULT_PERIOD = 86400  # bwmon's: one day


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


# --- the whole file -----------------------------------------------------------------


# <policy>: domain metadata is re-read at this period (and on libvirt's
# metadata-change event), within this range.
DEFAULT_REFRESH = 300
REFRESH_RANGE = (1, 7 * 86400)


@dataclass(frozen=True)
class Rule:
    """What one source says of a VM's view; None fields are not said (taken from below)."""

    allow: Tuple[str, ...] | None = None  # None: not said; () never (an empty list is None)
    deny: Tuple[str, ...] | None = None
    blocked: bool | None = None
    shared: bool | None = None


@dataclass(frozen=True)
class PolicyConfig:
    """``<policy>``: the default rule, per-VM rules by name and by UUID, metadata reading."""

    default: Rule = Rule()
    by_name: Dict[str, Rule] = field(default_factory=dict)
    by_uuid: Dict[str, Rule] = field(default_factory=dict)
    metadata: bool = True
    refresh: int = DEFAULT_REFRESH  # seconds between two reads of every domain's metadata
    state_dir: str | None = None  # where policy.json goes (vhostmdctl policy); None: nowhere

    def config_rule(self, name: str, uuid: str) -> Tuple[str, Rule] | None:
        """This file's rule for the VM (by UUID first), with its origin, or None."""
        rule = self.by_uuid.get(uuid.lower())
        if rule is not None:
            return f"config policy_vm uuid={uuid.lower()}", rule
        rule = self.by_name.get(name)
        if rule is not None:
            return f"config policy_vm name={name}", rule
        return None


@dataclass(frozen=True)
class Config:
    """A loaded, validated vhostmd.conf: its 16 fields.

    ``file`` (the path it was read from, for messages and reloads);
    ``disk_name``, ``disk_path``, ``disk_size`` (bytes): ``<disk>``;
    ``update_period`` (seconds); ``path`` (the actions' PATH);
    ``transports`` (``vbd`` and/or ``virtio``); ``virtio`` (VirtioConfig,
    defaults applied even without ``<virtio>``); ``metrics`` (MetricSpec, in
    config order); then the optional vhostmd-py sections, None when absent:
    ``history`` (HistoryConfig), ``metrics_endpoint`` (EndpointConfig),
    ``alarms`` (AlarmsConfig), ``accounting`` (AccountingConfig),
    ``disk_per_vm`` (PerVmDiskConfig), ``freshness`` (FreshnessConfig),
    ``policy`` (PolicyConfig: what each VM may see).
    """

    file: str
    disk_name: str
    disk_path: str
    disk_size: int  # bytes
    update_period: int  # seconds, >= 1
    path: str  # PATH of the actions
    transports: Tuple[str, ...]
    virtio: VirtioConfig
    metrics: Tuple[MetricSpec, ...]
    history: HistoryConfig | None = None  # None: no <history>, the history is off
    metrics_endpoint: EndpointConfig | None = None
    alarms: AlarmsConfig | None = None
    accounting: AccountingConfig | None = None
    disk_per_vm: PerVmDiskConfig | None = None
    freshness: FreshnessConfig | None = None
    policy: PolicyConfig | None = None  # None: every VM sees everything, as upstream

    def host_metrics(self) -> Tuple[MetricSpec, ...]:
        """Metrics evaluated once per cycle, in config order."""
        return tuple(m for m in self.metrics if m.context == "host")

    def vm_metrics(self) -> Tuple[MetricSpec, ...]:
        """Metrics evaluated for every running VM, in config order."""
        return tuple(m for m in self.metrics if m.context == "vm")
