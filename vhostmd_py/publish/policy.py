"""What each VM may see of a cycle's snapshot: the per-VM policy applied at publication.

vhostmd_py.config.policy says what a rule is and where a VM's rule comes
from (vhostmd.conf's ``<policy_vm>``, the domain's metadata read by
vhostmd_py.sources.metadata, ``<policy_default>``). Here the rules are
applied to a rendered Snapshot, per transport:

- a per-VM disk and a virtio reply hold the host metrics that VM may see and
  its own block with the metrics of its own it may see; a blocked VM gets an
  empty document on its disk and the protocol's error over virtio;
- the shared disk, which every VM attached to it reads, holds only the host
  metrics that every running VM (and the default rule) may see, and the
  blocks of the VMs whose rule says ``shared`` (the default: upstream's
  layout), each cut to what that VM may see of its own.

Metric elements are told apart in the rendered bytes (every element starts
``<metric`` and ends ``</metric>``, vhostmd_py.cycle.render); a per-device
field's elements are judged by their own names (``name.vda``) and, failing
that, by the configured name before the first dot.
"""

from __future__ import annotations

import json
import re
from html import unescape
from typing import Dict, Iterable, List, Tuple

from vhostmd_py.config.policy import Effective, resolve
from vhostmd_py.config.records import PolicyConfig
from vhostmd_py.cycle.snapshot import VM, Snapshot, VmBlock
from vhostmd_py.sources.metadata import MetadataBook

_ELEMENT = re.compile(rb"[ \t]*<metric\b.*?</metric>[ \t]*\n?", re.DOTALL)
_NAME = re.compile(rb"<name>(.*?)</name>", re.DOTALL)


def elements(xml: bytes) -> List[Tuple[str, bytes]]:
    """The (name, bytes) of each ``<metric>`` element in XML, in order."""
    out = []
    for match in _ELEMENT.finditer(xml):
        found = _NAME.search(match.group(0))
        name = unescape(found.group(1).decode("utf-8", "replace")).strip() if found else ""
        out.append((name, match.group(0)))
    return out


def _visible(policy: Effective, name: str) -> bool:
    if policy.sees(name):
        return True
    # A per-device element (name.vda): the configured name decides too.
    head = name.split(".", 1)[0]
    return head != name and policy.sees(head)


def cut(xml: bytes, policies: Iterable[Effective]) -> bytes:
    """The elements of XML that every one of POLICIES may see."""
    policies = tuple(policies)
    if not any(p.restricts for p in policies):
        return xml
    return b"".join(raw for name, raw in elements(xml)
                    if all(_visible(p, name) for p in policies))


class PolicyView:
    """The policies in force: config rules, the domains' metadata, and the views they give."""

    def __init__(self, config: PolicyConfig, book: MetadataBook | None = None) -> None:
        self.config = config
        self.book = book
        self._default = resolve(("config policy_default", config.default))

    def effective(self, vm: VM) -> Effective:
        """VM's policy: its <policy_vm>, else its metadata, over <policy_default>."""
        own = self.config.config_rule(vm.name, vm.uuid)
        meta = self.book.policy(vm.uuid) if self.book is not None and self.config.metadata else None
        first = own if own is not None else (
            ("metadata", meta.rule) if meta is not None and meta.rule is not None else None)
        return resolve(first or ("", None), ("config policy_default", self.config.default))

    def for_vm(self, snapshot: Snapshot, vm: VM) -> Snapshot | None:
        """What VM may read of SNAPSHOT (host part and its own block), None when blocked."""
        policy = self.effective(vm)
        if policy.blocked:
            return None
        blocks = tuple(VmBlock(b.vm, cut(b.xml, (policy,)))
                       for b in snapshot.vms if b.vm.uuid == vm.uuid)
        return Snapshot(host=cut(snapshot.host, (policy,)), vms=blocks)

    def shared(self, snapshot: Snapshot, running: Iterable[VM] = ()) -> Snapshot:
        """What the shared disk may hold: what every running VM may see, shared blocks only."""
        vms = {b.vm.uuid: b.vm for b in snapshot.vms}
        for vm in running:
            vms.setdefault(vm.uuid, vm)
        policies = {uuid: self.effective(vm) for uuid, vm in vms.items()}
        host = cut(snapshot.host, (self._default, *policies.values()))
        blocks = tuple(
            VmBlock(b.vm, cut(b.xml, (policies[b.vm.uuid],)))
            for b in snapshot.vms
            if policies[b.vm.uuid].shared and not policies[b.vm.uuid].blocked
        )
        return Snapshot(host=host, vms=blocks)

    def table(self, vms: Iterable[VM]) -> Dict[str, Dict[str, object]]:
        """Every VM's effective policy and where each field came from (vhostmdctl policy)."""
        out: Dict[str, Dict[str, object]] = {}
        for vm in vms:
            policy = self.effective(vm)
            meta = self.book.policy(vm.uuid) if self.book is not None else None
            out[vm.uuid] = {
                "name": vm.name,
                "allow": list(policy.allow),
                "deny": list(policy.deny),
                "blocked": policy.blocked,
                "shared": policy.shared,
                "origin": dict(policy.origin),
                "perfmon": None if meta is None or meta.perfmon is None
                else meta.perfmon.decode("utf-8", "replace"),
            }
        return out


def table_json(table: Dict[str, Dict[str, object]], *, written: float) -> bytes:
    """The state file's bytes (policy.json)."""
    return json.dumps({"version": 1, "written": written, "vms": table},
                      indent=1, sort_keys=True).encode("utf-8")
