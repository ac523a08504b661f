"""Each domain's own policy, from its libvirt metadata (our namespace), read rarely and safely.

The metadata element travels with the domain (migration, ``virsh dumpxml``)
and is set with::

    virsh metadata DOMAIN --uri http://vhostmd-py.github.io/xmlns/1 --key vhostmd \\
        --live --config --set '<policy blocked="no"><deny>HostName</deny></policy>'

Its root is ``<policy>`` with the rule vocabulary of vhostmd.conf's
``<policy_vm>`` (vhostmd_py.config.policy) and, optionally, XenServer
perfmon's own ``<config><variable>...</variable></config>`` for that VM's
alarms, kept here as bytes for the alarms to parse.

It is read for a VM when it first appears, every ``refresh`` seconds, and
when libvirt says it changed (its metadata-change event, when an event loop
runs), never per cycle for every VM. Whoever can define a domain writes its
metadata, so it is hostile input: at most MAX_METADATA bytes and MAX_DEPTH
levels, parsed without DTD, entities or network; a bad one is logged with
the domain (once per distinct content) and ignored for that domain only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Set

from lxml import etree

from vhostmd_py.config.policy import RuleError, rule_of
from vhostmd_py.config.records import Rule
from vhostmd_py.safexml import safe_parser
from vhostmd_py.sources.vm import VM

log = logging.getLogger(__name__)

NAMESPACE = "http://vhostmd-py.github.io/xmlns/1"
KEY = "vhostmd"
MAX_METADATA = 64 * 1024
MAX_DEPTH = 16
# libvirt's VIR_ERR_NO_DOMAIN_METADATA: the domain has no element of our namespace.
_NO_METADATA = 80


@dataclass(frozen=True)
class DomainPolicy:
    """What a domain's metadata says: its rule (None: no rule) and perfmon's <config>."""

    rule: Rule | None = None
    perfmon: bytes | None = None  # perfmon's <config> element, as bytes


class MetadataError(ValueError):
    """Metadata that cannot be used; the message says why."""


def parse_metadata(xml: bytes | str) -> DomainPolicy:
    """A domain's metadata element -> DomainPolicy (MetadataError when unusable)."""
    data = xml.encode("utf-8", "replace") if isinstance(xml, str) else xml
    if len(data) > MAX_METADATA:
        raise MetadataError(f"{len(data)} bytes, more than {MAX_METADATA}")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise MetadataError("a DOCTYPE or an entity declaration (refused)")
    try:
        root = etree.fromstring(data, safe_parser())
    except (etree.XMLSyntaxError, ValueError) as err:
        raise MetadataError(f"not XML: {err}") from None
    depth = _depth(root)
    if depth > MAX_DEPTH:
        raise MetadataError(f"{depth} levels deep, more than {MAX_DEPTH}")
    if etree.QName(root).localname != "policy":
        raise MetadataError(f"root <{etree.QName(root).localname}>, expected <policy>")
    try:
        rule = rule_of(root)
    except RuleError as err:
        raise MetadataError(str(err)) from None
    perfmon = None
    for child in root:
        if isinstance(child.tag, str) and etree.QName(child).localname == "config":
            perfmon = _without_namespaces(child)
    said = any(v is not None for v in (rule.allow, rule.deny, rule.blocked, rule.shared))
    return DomainPolicy(rule=rule if said else None, perfmon=perfmon)


def _depth(root: etree._Element) -> int:
    deepest = 0
    for _, elem in etree.iterwalk(root, events=("start",)):
        level = 1
        parent = elem.getparent()
        while parent is not None:
            level += 1
            parent = parent.getparent()
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            break
    return deepest


def _without_namespaces(elem: etree._Element) -> bytes:
    """ELEM as bytes with every namespace dropped (libvirt puts ours on the children)."""
    copy = etree.fromstring(etree.tostring(elem), safe_parser())
    for node in copy.iter():
        if isinstance(node.tag, str):
            node.tag = etree.QName(node).localname
    etree.cleanup_namespaces(copy)
    return bytes(etree.tostring(copy))


def read_domain(conn: Any, vm: VM, libvirt: Any) -> bytes | None:
    """The raw metadata element of VM's domain in our namespace, None when it has none.

    Blocking (the libvirt worker calls it); a libvirtError other than "no
    metadata" propagates for the caller to log.
    """
    dom = conn.lookupByUUIDString(vm.uuid)
    try:
        xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, 0)
    except libvirt.libvirtError as err:
        if err.get_error_code() == _NO_METADATA:
            return None
        raise
    return str(xml).encode("utf-8", "replace")


class MetadataBook:
    """Every running VM's metadata policy, re-read at the refresh period or when told."""

    def __init__(
        self,
        *,
        refresh: float,
        reader: Callable[[VM], bytes | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.refresh = refresh
        self._reader = reader
        self._clock = clock
        self._policies: Dict[str, DomainPolicy] = {}
        self._read_at: Dict[str, float] = {}
        self._dirty: Set[str] = set()
        self._bad: Dict[str, bytes] = {}  # uuid -> the content last logged as bad
        self.reads = 0  # metadata reads so far (tests and the log show it is rare)

    def changed(self, uuid: str) -> None:
        """libvirt said UUID's metadata changed: read it again at the next update."""
        self._dirty.add(uuid.lower())

    def policy(self, uuid: str) -> DomainPolicy | None:
        """The last policy read for UUID (None: none, or not read yet, or unusable)."""
        return self._policies.get(uuid.lower())

    def update(self, vms: Iterable[VM]) -> bool:
        """Read what is due for the running VMS (blocking); True when any policy changed."""
        now = self._clock()
        running = {vm.uuid.lower(): vm for vm in vms}
        changed = False
        for uuid in set(self._policies) - set(running):
            del self._policies[uuid]
            changed = True
        for uuid in set(self._read_at) - set(running):
            self._read_at.pop(uuid, None)
            self._bad.pop(uuid, None)
        self._dirty &= set(running)
        for uuid, vm in running.items():
            due = uuid in self._dirty or now - self._read_at.get(uuid, -1e18) >= self.refresh
            if not due:
                continue
            self._dirty.discard(uuid)
            self._read_at[uuid] = now
            before = self._policies.get(uuid)
            after = self._read(vm)
            if after != before:
                changed = True
                if after is None:
                    self._policies.pop(uuid, None)
                else:
                    self._policies[uuid] = after
        return changed

    def _read(self, vm: VM) -> DomainPolicy | None:
        self.reads += 1
        try:
            raw = self._reader(vm)
        except Exception as err:  # a domain gone meanwhile, a libvirt hiccup: keep none
            log.debug("metadata of VM %r (%s) not read: %s", vm.name, vm.uuid, err)
            return self._policies.get(vm.uuid.lower())
        if raw is None:
            self._bad.pop(vm.uuid.lower(), None)
            return None
        try:
            found = parse_metadata(raw)
        except MetadataError as err:
            if self._bad.get(vm.uuid.lower()) != raw:
                self._bad[vm.uuid.lower()] = raw
                log.error("policy in the metadata of VM %r (%s) ignored: %s",
                          vm.name, vm.uuid, err)
            return None
        self._bad.pop(vm.uuid.lower(), None)
        return found
