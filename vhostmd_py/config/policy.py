"""The ``<policy>`` section of vhostmd.conf: which metrics each VM may see (vhostmd-py extension).

    <policy metadata="yes" refresh="5m">
      <policy_default shared="yes">
        <deny>HostName</deny>
      </policy_default>
      <policy_vm name="sap01"><allow>VCpus</allow><allow>Total*</allow></policy_vm>
      <policy_vm uuid="..." blocked="yes"/>
    </policy>

A rule says, for one VM: the metrics it may see (``allow``: names or glob
patterns, none meaning all; ``deny``: names or patterns taken away again),
for the host's metrics and its own alike; whether it is ``blocked`` (its
per-VM disk holds an empty document, virtio answers it the protocol's
error); and whether its block is ``shared``, i.e. put on the shared metrics
disk, which every VM attached to it reads. The same rule vocabulary is
read from a domain's libvirt metadata (vhostmd_py.sources.metadata).

Without a ``<policy>`` section nothing changes: every VM sees everything,
as upstream. The rule of a VM is, first found: its ``<policy_vm>`` here
(the host's file is final), its domain metadata (``metadata="yes"``, the
default), ``<policy_default>``. An attribute or list a rule does not give
comes from ``<policy_default>``, then from the built-in default (allow all,
deny none, not blocked, shared).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Dict, Tuple

from lxml import etree

from vhostmd_py.config.document import line_of
from vhostmd_py.config.records import DEFAULT_REFRESH, REFRESH_RANGE, PolicyConfig, Rule
from vhostmd_py.config.units import DEFAULT_STATE_DIR, duration_of
from vhostmd_py.errors import ConfigError

# The state file that says each VM's policy in force (vhostmdctl policy).
POLICY_FILE = "policy.json"


@dataclass(frozen=True)
class Effective:
    """A VM's policy in force, every field decided, with where each came from."""

    allow: Tuple[str, ...] = ()  # empty: every metric
    deny: Tuple[str, ...] = ()
    blocked: bool = False
    shared: bool = True
    origin: Dict[str, str] = field(default_factory=dict, compare=False)

    def sees(self, name: str) -> bool:
        """Whether a metric named NAME is visible (blocked VMs see nothing)."""
        if self.blocked:
            return False
        if self.allow and not any(fnmatch.fnmatchcase(name, p) for p in self.allow):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in self.deny)

    @property
    def restricts(self) -> bool:
        """Whether any metric is hidden (allow or deny given, or blocked)."""
        return self.blocked or bool(self.allow) or bool(self.deny)


BUILT_IN = Effective(origin={k: "built-in" for k in ("allow", "deny", "blocked", "shared")})


def resolve(*rules: Tuple[str, Rule | None]) -> Effective:
    """The effective policy from RULES, highest first: each (origin name, rule or None)."""
    values: Dict[str, object] = {}
    origin: Dict[str, str] = {}
    for where, rule in rules:
        if rule is None:
            continue
        for name in ("allow", "deny", "blocked", "shared"):
            value = getattr(rule, name)
            if name not in values and value is not None:
                values[name] = value
                origin[name] = where
    for name in ("allow", "deny", "blocked", "shared"):
        if name not in values:
            values[name] = getattr(BUILT_IN, name)
            origin[name] = "built-in"
    return Effective(
        allow=values["allow"],  # type: ignore[arg-type]
        deny=values["deny"],  # type: ignore[arg-type]
        blocked=values["blocked"],  # type: ignore[arg-type]
        shared=values["shared"],  # type: ignore[arg-type]
        origin=origin,
    )


class RuleError(ValueError):
    """A rule element that cannot be used (the message says why; the caller adds where)."""


def _flag(elem: etree._Element, name: str) -> bool | None:
    raw = elem.get(name)
    if raw is None:
        return None
    if raw not in ("yes", "no"):
        raise RuleError(f"{name}=\"{raw}\": expected yes or no")
    return raw == "yes"


def _pattern(text: str | None, tag: str) -> str:
    pattern = (text or "").strip()
    if not pattern:
        raise RuleError(f"<{tag}> is empty: give a metric name or a pattern")
    if len(pattern) > 256 or any(ord(c) < 32 for c in pattern):
        raise RuleError(f"<{tag}>: not a metric name or pattern")
    return pattern


def rule_of(elem: etree._Element) -> Rule:
    """The rule an element says (``<policy_default>``, ``<policy_vm>``, metadata's ``<policy>``).

    Children other than allow/deny are the caller's (metadata's perfmon
    ``<config>``); namespaces are ignored (libvirt's metadata has ours).
    """
    allow, deny = [], []
    for child in elem:
        if not isinstance(child.tag, str):
            continue  # a comment or a processing instruction
        tag = etree.QName(child).localname
        if tag == "allow":
            allow.append(_pattern(child.text, tag))
        elif tag == "deny":
            deny.append(_pattern(child.text, tag))
    return Rule(
        allow=tuple(allow) or None,
        deny=tuple(deny) or None,
        blocked=_flag(elem, "blocked"),
        shared=_flag(elem, "shared"),
    )


def parse_policy(elem: etree._Element, file: str) -> PolicyConfig:
    """``<policy>`` (already DTD-valid) -> PolicyConfig; ConfigError with file:line."""

    def fail(where: etree._Element, reason: str) -> ConfigError:
        return ConfigError(file, reason, line_of(where))

    try:
        metadata = _flag(elem, "metadata")
    except RuleError as err:
        raise fail(elem, f"<policy>: {err}") from None
    state_dir = elem.get("state_dir", DEFAULT_STATE_DIR)
    refresh = DEFAULT_REFRESH
    raw = elem.get("refresh")
    if raw is not None:
        refresh = duration_of(raw, file, line_of(elem), "<policy> refresh")
        if not REFRESH_RANGE[0] <= refresh <= REFRESH_RANGE[1]:
            raise fail(elem, f"<policy> refresh {raw!r} out of range "
                             f"({REFRESH_RANGE[0]} to {REFRESH_RANGE[1]} s)")
    default = Rule()
    by_name: Dict[str, Rule] = {}
    by_uuid: Dict[str, Rule] = {}
    for child in elem:
        if not isinstance(child.tag, str):
            continue
        try:
            rule = rule_of(child)
        except RuleError as err:
            raise fail(child, f"<{child.tag}>: {err}") from None
        if child.tag == "policy_default":
            default = rule
            continue
        name, uuid = child.get("name"), child.get("uuid")
        if (name is None) == (uuid is None):
            raise fail(child, "<policy_vm> needs exactly one of name= or uuid=")
        if uuid is not None:
            table, key = by_uuid, uuid.strip().lower()
        else:
            table, key = by_name, str(name)
        if key in table:
            raise fail(child, f"<policy_vm> for {key} given twice")
        table[key] = rule
    return PolicyConfig(default=default, by_name=by_name, by_uuid=by_uuid,
                        metadata=True if metadata is None else metadata, refresh=refresh,
                        state_dir=state_dir)
