"""vhostmd.conf -> frozen, typed records, validated against the shipped DTD, once.

The file is parsed with a safe lxml parser (no network, no DTD loading, no
entity expansion) and ALWAYS validated against our own ``vhostmd.dtd``
(package data): upstream resolves the DOCTYPE's system id next to the
config and refuses a file without DOCTYPE ("Validation failed: no DTD
found !", daemon-cli/no-doctype.stderr). DEVIATION: a config without a
DOCTYPE, or whose DOCTYPE names another location, is validated against our
grammar and accepted when valid.

Our grammar is upstream's with one relaxation (SPEC section 1):
``channel_path`` is optional in ``<virtio>`` so the README example loads,
and optional extensions last in ``<globals>``: ``<history .../>`` (the RRD
history, vhostmd_py/history) then ``<metrics_endpoint .../>`` (the OpenMetrics
endpoint, vhostmd_py/endpoint), so every upstream config stays valid.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Sequence, Tuple

from lxml import etree
from vhostmd_wire.disk import MAX_DISK_SIZE, MIN_DISK_SIZE, UPSTREAM_READ_BLOCK

from vhostmd_py.cycle.snapshot import DEFAULT_PATH
from vhostmd_py.errors import ConfigError, StrPath
from vhostmd_py.safexml import safe_parser

if TYPE_CHECKING:
    from vhostmd_py.config.monitors import AccountingConfig, AlarmsConfig

log = logging.getLogger(__name__)

DEFAULT_DISK_PATH = "/dev/shm/vhostmd0"
# libvirt creates auto-path channel sockets here (GUEST-E2E.md:
# .../channel/target/domain-<ID>-<NAME>/org.github.vhostmd.1).
DEFAULT_CHANNEL_PATH = "/var/lib/libvirt/qemu/channel/target"
DEFAULT_MAX_CHANNELS = 1024
DEFAULT_EXPIRATION_TIME = 15

TRANSPORTS = ("vbd", "virtio")
METRIC_TYPES = ("int32", "uint32", "int64", "uint64", "real32", "real64", "string")
CONTEXTS = ("host", "vm")

_UNITS = {"": 1, "k": 1024, "K": 1024, "m": 1048576, "M": 1048576}

# Every integer of the config has a closed range, checked at load time, so a
# value the daemon cannot use is refused with file:line (and a SIGHUP to it
# keeps the running config) instead of failing later: an update_period of
# 10**309 used to pass --dump and raise OverflowError in the cycle schedule.
# The ranges are documented in docs/man/vhostmd.conf.5 (section LIMITS).
# update_period: upstream's minimum 1 s; at most one day (a longer period is
# not monitoring any more, and the schedule's float arithmetic stays exact).
UPDATE_PERIOD_RANGE = (1, 86400)
# max_channels: one open socket per VM; 65536 is far beyond the fds a process
# gets (the virtio transport also caps itself at what RLIMIT_NOFILE allows).
MAX_CHANNELS_RANGE = (1, 65536)
# expiration_time: raised to 3 x update_period anyway (upstream), so its
# maximum is three times the longest period.
EXPIRATION_TIME_RANGE = (1, 3 * UPDATE_PERIOD_RANGE[1])
# <size> times its unit: MIN_DISK_SIZE..MAX_DISK_SIZE bytes (upstream's range).
# Upstream reads numbers with strtol/atoi: ASCII digits with an optional sign.
# Python's int() would also take "1_000" or Arabic-Indic digits; refuse those.
_INTEGER = re.compile(r"[+-]?[0-9]+\Z")
# Longer digit strings are out of every range above: never convert them (no
# huge ints, no int()'s 4300-digit ValueError) and shorten them in messages.
_MAX_DIGITS = 18


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


DEFAULT_STATE_DIR = "/var/lib/vhostmd"
DEFAULT_RETENTION = 7 * 86400
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")


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
ENDPOINT_PORT_RANGE = (0, 65535)  # 0: any free port


@dataclass(frozen=True)
class EndpointConfig:
    """``<globals><metrics_endpoint>``: the OpenMetrics endpoint (present = enabled)."""

    address: str = DEFAULT_ENDPOINT_ADDRESS  # an IP literal; loopback unless allow_remote
    port: int = DEFAULT_ENDPOINT_PORT  # 0: any free port (logged)
    allow_remote: bool = False


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` -> seconds (ValueError otherwise)."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"'{text}' is not a duration (a number with s, m, h, d or w)")
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]


DEFAULT_IDENTITY_KEY = "/var/lib/vhostmd/identity.key"
DEFAULT_MACHINE_ID = "/etc/machine-id"
# The one substitution of a per-VM disk path: the VM's UUID (never its name:
# a name is chosen by whoever defines the domain and must never reach a path).
PERVM_UUID_TOKEN = "%u"
# grace: how long a gone VM's disk is kept (seconds); a restart or a
# migration back must not race its removal. Bounded like expiration_time.
PERVM_GRACE_RANGE = EXPIRATION_TIME_RANGE


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


@dataclass(frozen=True)
class Config:
    """A loaded, validated vhostmd.conf."""

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
    # vhostmd-py extension (issue 15): None when there is no <metrics_endpoint>.
    metrics_endpoint: EndpointConfig | None = None
    # vhostmd-py extension (issue 14): the optional <alarms> and <accounting>
    # sections (vhostmd_py/monitor_config.py); None when absent.
    alarms: AlarmsConfig | None = None
    accounting: AccountingConfig | None = None
    # vhostmd-py extension (issue 15): per-VM disks and freshness metrics.
    disk_per_vm: PerVmDiskConfig | None = None
    freshness: FreshnessConfig | None = None

    def host_metrics(self) -> Tuple[MetricSpec, ...]:
        """Metrics evaluated once per cycle, in config order."""
        return tuple(m for m in self.metrics if m.context == "host")

    def vm_metrics(self) -> Tuple[MetricSpec, ...]:
        """Metrics evaluated for every running VM, in config order."""
        return tuple(m for m in self.metrics if m.context == "vm")


def default_dtd_path() -> Path:
    """The shipped vhostmd.dtd (package data)."""
    return Path(str(resources.files("vhostmd_py") / "data" / "vhostmd.dtd"))


def load_config(path: StrPath, *, dtd: StrPath | None = None) -> Config:
    """Read, validate and convert a vhostmd.conf; ConfigError names file, line and reason."""
    file = os.fspath(path)
    try:
        with open(file, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise ConfigError(file, f"could not read file: {err.strerror or err}") from err
    return parse_config(data, file=file, dtd=dtd)


def _load_dtd(file: str, dtd: StrPath | None) -> etree.DTD:
    dtd_file = os.fspath(dtd) if dtd is not None else str(default_dtd_path())
    try:
        with open(dtd_file, "rb") as fh:
            return etree.DTD(fh)
    except (OSError, etree.DTDParseError) as err:
        raise ConfigError(file, f"cannot load the configuration grammar {dtd_file}: {err}") from err


def parse_config(data: bytes, *, file: str = "<config>", dtd: StrPath | None = None) -> Config:
    """Validate and convert config bytes (``file`` is only used in messages)."""
    try:
        root = etree.fromstring(data, safe_parser())
    except etree.XMLSyntaxError as err:
        line = err.lineno if err.lineno else None
        reason = f"XML syntax error: {err.msg}"
        hint = _ampersand_hint(data, line, str(err.msg))
        raise ConfigError(file, f"{reason}{hint}", line) from err
    for node in root.iter(etree.Entity):
        # resolve_entities=False leaves them as nodes; their text would be
        # silently missing from an action, so refuse instead.
        raise ConfigError(file, f"entity reference {node.text} is not supported", _line(node))
    if root.tag != "vhostmd":
        raise ConfigError(file, f"root element is <{root.tag}>, expected <vhostmd>", _line(root))
    grammar = _load_dtd(file, dtd)
    if not grammar.validate(root):
        raise _dtd_error(file, [*grammar.error_log])  # type: ignore[misc]
    return _with_monitoring(_convert(root, file), root, file, grammar)


def _with_monitoring(config: Config, root: etree._Element, file: str, grammar: etree.DTD) -> Config:
    """Add the optional <alarms> and <accounting> sections (vhostmd-py extension)."""
    alarms, accounting = root.find("alarms"), root.find("accounting")
    if alarms is None and accounting is None:
        return config
    from vhostmd_py.config.monitors import parse_accounting, parse_alarms

    return replace(
        config,
        alarms=parse_alarms(alarms, file, grammar) if alarms is not None else None,
        accounting=parse_accounting(accounting, file, grammar) if accounting is not None else None,
    )


def _ampersand_hint(data: bytes, line: int | None, message: str) -> str:
    """A hint for the commonest syntax error in actions: a raw `&` (`a && b`, `cmd &`).

    libxml only says "xmlParseEntityRef: no name" (or "EntityRef: expecting
    ';'"), which names nothing an operator wrote; the shell's `&&` must be
    written `&amp;&amp;` in XML.
    """
    if line is None or "EntityRef" not in message:
        return ""
    lines = data.splitlines()
    if not 1 <= line <= len(lines) or b"&" not in lines[line - 1]:
        return ""
    return (
        " (a raw '&' in the text: in XML write '&&' as '&amp;&amp;' and '&' as '&amp;', "
        "or put the action in <![CDATA[ ... ]]>)"
    )


def _dtd_error(file: str, entries: List[Any]) -> ConfigError:
    # libxml reports a parent's "content does not follow the DTD" before the
    # unknown child that caused it; upstream (validating while parsing) names
    # the child first (daemon-cli/dtd-invalid.stderr: "No declaration for
    # element bogus" at line 13), which is the useful one: put it first.
    entries = sorted(entries, key=lambda e: not str(e.message).startswith("No declaration"))
    if not entries:
        return ConfigError(file, "fails DTD validation")
    first = entries[0]
    reason = f"fails DTD validation: {first.message}"
    others = [f"line {e.line}: {e.message}" for e in entries[1:4]]
    if others:
        reason += " (also " + "; ".join(others) + ")"
    return ConfigError(file, reason, first.line or None)


def _line(elem: etree._Element) -> int | None:
    line = elem.sourceline
    return line if isinstance(line, int) else None


def _text(elem: etree._Element) -> str:
    # String value of the element (comments excluded), like libxml's
    # xmlNodeGetContent that upstream uses.
    return str(elem.xpath("string()")).strip()


def _shown(raw: str) -> str:
    """RAW for a message; a 310-digit number is cut to its start and its length."""
    if len(raw) <= _MAX_DIGITS + 2:
        return raw
    return f"{raw[:12]}...({len(raw)} characters)"


def _integer(raw: str, file: str, what: str, elem: etree._Element, low: int, high: int,
             unit: str) -> int:
    """RAW as an int within LOW..HIGH, else ConfigError naming WHAT, the range and the line."""
    allowed = f"allowed: {low} to {high}{unit}"
    if not _INTEGER.match(raw):
        raise ConfigError(
            file, f"{what} '{_shown(raw)}' is not an integer ({allowed})", _line(elem)
        )
    if len(raw.lstrip("+-").lstrip("0")) > _MAX_DIGITS:
        raise ConfigError(file, f"{what} {_shown(raw)} is out of range ({allowed})", _line(elem))
    value = int(raw, 10)
    if value > high:
        raise ConfigError(file, f"{what} {value} is out of range ({allowed})", _line(elem))
    return value


def _int(elem: etree._Element, file: str, what: str, bounds: Tuple[int, int], unit: str,
         below: str) -> int:
    """<WHAT> as an int in BOUNDS; BELOW is upstream's wording for a value under the minimum."""
    low, high = bounds
    value = _integer(_text(elem), file, what, elem, low, high, unit)
    if value < low:
        # Upstream's message first (golden daemon-cli/period-zero), then the range.
        raise ConfigError(
            file,
            f"Specified {below} ({value}) less than minimum supported ({low}) "
            f"(allowed: {low} to {high}{unit})",
            _line(elem),
        )
    return value


def _disk_size(elem: etree._Element, file: str) -> int:
    return _size_of(_text(elem), str(elem.get("unit", "")), elem, file)


def _size_of(raw: str, unit: str, elem: etree._Element, file: str) -> int:
    """RAW times UNIT in bytes, within the disk limits, else ConfigError at ELEM's line."""
    if not _INTEGER.match(raw):
        raise ConfigError(
            file,
            f"disk size '{_shown(raw)}' is not an integer "
            f"(allowed: {MIN_DISK_SIZE} to {MAX_DISK_SIZE} bytes, with unit k or m)",
            _line(elem),
        )
    if len(raw.lstrip("+-").lstrip("0")) > _MAX_DIGITS:
        raise ConfigError(
            file,
            f"Specified metrics disk size ({_shown(raw)}) not within supported range: "
            f"({MIN_DISK_SIZE} - {MAX_DISK_SIZE})",
            _line(elem),
        )
    number = int(raw, 10)
    factor = _UNITS.get(unit)
    if factor is None:
        # Upstream reports -1 for an unknown unit (daemon-cli/size-bad-unit);
        # keep its wording and say why.
        raise ConfigError(
            file,
            f"Specified metrics disk size (-1) not within supported range: "
            f"({MIN_DISK_SIZE} - {MAX_DISK_SIZE}) (unknown unit '{unit}': use k, K, m, M "
            f"or an empty unit for bytes)",
            _line(elem),
        )
    size = number * factor
    if not MIN_DISK_SIZE <= size <= MAX_DISK_SIZE:
        raise ConfigError(
            file,
            f"Specified metrics disk size ({size}) not within supported range: "
            f"({MIN_DISK_SIZE} - {MAX_DISK_SIZE})",
            _line(elem),
        )
    return size


def _transports(globals_: etree._Element, file: str) -> Tuple[str, ...]:
    found: List[str] = []
    for elem in globals_.findall("transport"):
        name = _text(elem)
        if name == "xenstore":
            # This build has no xenstore writer, like upstream built
            # --without-xenstore (daemon-cli/xenstore.stderr).
            raise ConfigError(
                file, "No support for xenstore transport in this vhostmd", _line(elem)
            )
        if name not in TRANSPORTS:
            raise ConfigError(
                file,
                f"Unknown transport '{name}' (supported: {', '.join(TRANSPORTS)})",
                _line(elem),
            )
        if name not in found:
            found.append(name)
    return tuple(found) or ("vbd",)


def _virtio(globals_: etree._Element, file: str, update_period: int) -> VirtioConfig:
    elems = globals_.findall("virtio")
    if len(elems) > 1:
        log.warning(
            "%s:%s: more than one <virtio> element; using the first",
            file,
            _line(elems[1]),
        )
    channel_path = DEFAULT_CHANNEL_PATH
    max_channels = DEFAULT_MAX_CHANNELS
    expiration = DEFAULT_EXPIRATION_TIME
    if elems:
        virtio = elems[0]
        cp = virtio.find("channel_path")
        if cp is not None and _text(cp):
            channel_path = _text(cp)
        mc = virtio.find("max_channels")
        if mc is not None:
            max_channels = _int(mc, file, "max_channels", MAX_CHANNELS_RANGE, "", "max_channels")
        et = virtio.find("expiration_time")
        if et is not None:
            expiration = _int(
                et, file, "expiration_time", EXPIRATION_TIME_RANGE, " seconds", "expiration_time"
            )
    # Upstream raises it so a channel never expires between two updates
    # (FACTS section 4: effective expiration = max(expiration_time, 3 x period)).
    expiration = max(expiration, 3 * update_period)
    return VirtioConfig(channel_path, max_channels, expiration)


def _history(globals_: etree._Element, file: str, update_period: int) -> HistoryConfig | None:
    elem = globals_.find("history")
    if elem is None:
        return None
    line = _line(elem)
    state_dir = str(elem.get("state_dir", DEFAULT_STATE_DIR)).strip()
    if not os.path.isabs(state_dir):
        raise ConfigError(file, f"history state_dir '{state_dir}' is not an absolute path", line)
    retention = DEFAULT_RETENTION
    raw = elem.get("retention")
    if raw is not None:
        try:
            retention = parse_duration(str(raw))
        except ValueError as err:
            raise ConfigError(file, f"history retention: {err}", line) from err
    publish_raw = str(elem.get("publish", "no")).strip().lower()
    if publish_raw not in ("yes", "no"):
        raise ConfigError(file, f"history publish '{publish_raw}' is not yes or no", line)
    daemon = elem.get("rrdcached")
    daemon = str(daemon).strip() if daemon is not None and str(daemon).strip() else None
    heartbeat = None
    raw = elem.get("heartbeat")
    if raw is not None:
        try:
            heartbeat = parse_duration(str(raw))
        except ValueError as err:
            raise ConfigError(file, f"history heartbeat: {err}", line) from err
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


def _disk_per_vm(
    globals_: etree._Element, file: str, disk_size: int, grace: int
) -> PerVmDiskConfig | None:
    elem = globals_.find("disk_per_vm")
    if elem is None:
        return None
    line = _line(elem)
    path = str(elem.get("path", "")).strip()
    where = f"disk_per_vm path '{path}'"
    if not os.path.isabs(path) or os.path.normpath(path) != path:
        raise ConfigError(file, f"{where} is not a normalised absolute path", line)
    directory, name = os.path.split(path)
    if name.count(PERVM_UUID_TOKEN) != 1 or "%" in directory:
        raise ConfigError(
            file, f"{where} must hold {PERVM_UUID_TOKEN} (the VM's UUID) exactly once, "
            "in its last component", line,
        )
    if "%" in name.replace(PERVM_UUID_TOKEN, ""):
        raise ConfigError(
            file, f"{where}: only {PERVM_UUID_TOKEN} (the VM's UUID) may be substituted", line
        )
    if directory == "/":
        raise ConfigError(file, f"{where}: the disks need a directory of their own", line)
    size = disk_size
    raw = elem.get("size")
    if raw is not None:
        size = _size_of(str(raw).strip(), str(elem.get("unit", "")), elem, file)
    elif elem.get("unit") is not None:
        raise ConfigError(file, "disk_per_vm unit given without a size", line)
    raw = elem.get("grace")
    if raw is not None:
        try:
            grace = parse_duration(str(raw))
        except ValueError as err:
            raise ConfigError(file, f"disk_per_vm grace: {err}", line) from err
        low, high = PERVM_GRACE_RANGE
        if not low <= grace <= high:
            raise ConfigError(
                file, f"disk_per_vm grace {grace} is out of range (allowed: {low} to {high} "
                "seconds)", line,
            )
    return PerVmDiskConfig(path=path, size=size, grace=grace)


def _freshness(globals_: etree._Element, file: str) -> FreshnessConfig | None:
    elem = globals_.find("freshness")
    if elem is None:
        return None
    line = _line(elem)
    paths = {}
    for attr, default in (("identity_key", DEFAULT_IDENTITY_KEY),
                          ("machine_id", DEFAULT_MACHINE_ID)):
        value = str(elem.get(attr, default)).strip()
        if not os.path.isabs(value):
            raise ConfigError(file, f"freshness {attr} '{value}' is not an absolute path", line)
        paths[attr] = value
    key = paths["identity_key"] if str(elem.get("identity", "yes")) == "yes" else None
    return FreshnessConfig(identity_key=key, machine_id=paths["machine_id"])


def _metrics_endpoint(globals_: etree._Element, file: str) -> EndpointConfig | None:
    elem = globals_.find("metrics_endpoint")
    if elem is None:
        return None
    line = _line(elem)
    address = str(elem.get("address", DEFAULT_ENDPOINT_ADDRESS)).strip()
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        raise ConfigError(
            file, f"metrics_endpoint address '{address}' is not an IPv4 or IPv6 address", line
        ) from None
    allow_raw = str(elem.get("allow_remote", "no")).strip().lower()
    if allow_raw not in ("yes", "no"):
        raise ConfigError(file, f"metrics_endpoint allow_remote '{allow_raw}' is not yes or no",
                          line)
    allow_remote = allow_raw == "yes"
    if not ip.is_loopback and not allow_remote:
        raise ConfigError(
            file,
            f"metrics_endpoint address {ip} is not a loopback address: the endpoint shows "
            "every VM's name and metrics; set allow_remote=\"yes\" to serve it there",
            line,
        )
    port = DEFAULT_ENDPOINT_PORT
    raw = elem.get("port")
    if raw is not None:
        low, high = ENDPOINT_PORT_RANGE
        port = _integer(str(raw).strip(), file, "metrics_endpoint port", elem, low, high, "")
    return EndpointConfig(address=str(ip), port=port, allow_remote=allow_remote)


def _metric(elem: etree._Element, file: str) -> MetricSpec | None:
    """One <metric>, or None (logged) when it cannot be used."""
    where = f"{file}:{_line(elem)}"
    mtype = str(elem.get("type", ""))
    context = str(elem.get("context", ""))
    unit = elem.get("unit")
    name_elem = elem.find("name")
    action_elem = elem.find("action")
    name = _text(name_elem) if name_elem is not None else ""
    action = _text(action_elem) if action_elem is not None else ""
    source_elem = elem.find("source")
    source = _source(source_elem, file, mtype, context) if source_elem is not None else None
    if not name:
        log.warning("%s: skipping metric without a name", where)
        return None
    if source is None and not action:
        log.warning("%s: skipping metric %s: empty action", where, name)
        return None
    if mtype not in (*METRIC_TYPES, "group", "xml") or context not in CONTEXTS:
        log.warning(
            "%s: skipping metric %s: bad type %r or context %r", where, name, mtype, context
        )
        return None
    variables: List[Variable] = []
    if mtype == "group":
        for var in elem.findall("variable"):
            vname = str(var.get("name", "")).strip()
            vtype = str(var.get("type", ""))
            if not vname or vtype not in METRIC_TYPES:
                log.warning(
                    "%s:%s: skipping group metric %s: variable with empty name or bad type",
                    file,
                    _line(var),
                    name,
                )
                return None
            variables.append(Variable(vname, vtype))
        if not variables:
            log.warning("%s: skipping group metric %s: no <variable>", where, name)
            return None
    return MetricSpec(
        name=name,
        type=mtype,
        context=context,
        action=action,
        unit=str(unit) if unit else None,
        variables=tuple(variables),
        source=source,
    )


def _source(elem: etree._Element, file: str, mtype: str, context: str) -> str:
    """A <source> field name, checked against the catalogue, the metric's type and context."""
    from vhostmd_py.sources.builtin.catalogue import known_fields, lookup

    name = _text(elem)
    field = lookup(name)
    if field is None:
        raise ConfigError(
            file,
            f"unknown built-in source field '{name}'; known: {', '.join(known_fields())}",
            _line(elem),
        )
    if field.context != context:
        raise ConfigError(
            file,
            f"built-in source field '{name}' is for context '{field.context}', "
            f"the metric has context '{context}'",
            _line(elem),
        )
    allowed = field.compatible_types()
    if mtype not in allowed:
        raise ConfigError(
            file,
            f"built-in source field '{name}' gives {field.kind} values: metric type "
            f"'{mtype}' cannot hold them (use {', '.join(allowed)})",
            _line(elem),
        )
    parent = elem.getparent()
    given = len(parent.findall("variable")) if parent is not None else 0
    if field.kind == "group" and given > len(field.variables):
        raise ConfigError(
            file,
            f"built-in source field '{name}' gives {len(field.variables)} values "
            f"({', '.join(field.variables)}): too many <variable> elements",
            _line(elem),
        )
    return name


def _convert(root: etree._Element, file: str) -> Config:
    globals_ = root.find("globals")
    assert globals_ is not None  # guaranteed by the DTD
    disk = globals_.find("disk")
    assert disk is not None
    disk_name = _text(_child(disk, "name"))
    disk_path = _text(_child(disk, "path")) or DEFAULT_DISK_PATH
    size_elem = _child(disk, "size")
    disk_size = _disk_size(size_elem, file)
    if disk_size < UPSTREAM_READ_BLOCK:
        log.warning(
            "%s:%s: metrics disk size %d is smaller than %d bytes: upstream guest readers "
            "(vm-dump-metrics, libmetrics) cannot read it",
            file,
            _line(size_elem),
            disk_size,
            UPSTREAM_READ_BLOCK,
        )
    period_elem = _child(globals_, "update_period")
    update_period = _int(
        period_elem, file, "update_period", UPDATE_PERIOD_RANGE, " seconds", "update period"
    )
    path = _text(_child(globals_, "path")) or DEFAULT_PATH
    transports = _transports(globals_, file)
    virtio = _virtio(globals_, file, update_period)
    history = _history(globals_, file, update_period)
    # Default grace: the virtio expiration time (at least 3 update periods).
    disk_per_vm = _disk_per_vm(globals_, file, disk_size, virtio.expiration_time)
    freshness = _freshness(globals_, file)
    endpoint = _metrics_endpoint(globals_, file)
    metrics_elem = root.find("metrics")
    metrics: List[MetricSpec] = []
    if metrics_elem is not None:
        for elem in metrics_elem.findall("metric"):
            spec = _metric(elem, file)
            if spec is not None:
                metrics.append(spec)
    return Config(
        file=file,
        disk_name=disk_name,
        disk_path=disk_path,
        disk_size=disk_size,
        update_period=update_period,
        path=path,
        transports=transports,
        virtio=virtio,
        metrics=tuple(metrics),
        history=history,
        disk_per_vm=disk_per_vm,
        freshness=freshness,
        metrics_endpoint=endpoint,
    )


def _child(parent: etree._Element, tag: str) -> etree._Element:
    elem = parent.find(tag)
    assert elem is not None, tag  # guaranteed by the DTD
    return elem


__all__: Sequence[str] = (
    "Config",
    "EndpointConfig",
    "FreshnessConfig",
    "HistoryConfig",
    "MetricSpec",
    "PerVmDiskConfig",
    "Variable",
    "VirtioConfig",
    "default_dtd_path",
    "load_config",
    "parse_config",
    "parse_duration",
)
