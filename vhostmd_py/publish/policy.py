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

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from dataclasses import replace
from html import unescape
from typing import Any, Callable, Dict, Iterable, List, Sequence, Tuple

from vhostmd_py.config.policy import POLICY_FILE, Effective, resolve
from vhostmd_py.config.records import PolicyConfig
from vhostmd_py.cycle.snapshot import Snapshot, VmBlock
from vhostmd_py.errors import VhostmdError
from vhostmd_py.libvirt_host import events_running
from vhostmd_py.sources.metadata import NAMESPACE, MetadataBook, read_domain
from vhostmd_py.sources.vm import VM

log = logging.getLogger(__name__)


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


class PolicyStep:
    """The cycle step that keeps the policies in force and attaches them to each snapshot.

    Each cycle it reads the metadata that is due (a VM seen for the first
    time, the refresh period, libvirt's metadata-change event) on the
    libvirt worker, bounded by the libvirt timeout; it never reads every
    VM's metadata per cycle. It writes ``policy.json`` (for ``vhostmdctl
    policy``) atomically when a running VM's policy changes, and sets
    Snapshot.view, which the publishers apply.
    """

    reads_stats = False

    def __init__(
        self,
        config: PolicyConfig,
        *,
        vms: Callable[[], Sequence[VM]],
        host: Any = None,
        state_dir: str | None = None,
        timeout: float = 5.0,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        alarms: Callable[[VM], List[Dict[str, str]]] | None = None,
        vm_alarms: Dict[str, Tuple[Any, ...]] | None = None,
    ) -> None:
        """VM_ALARMS: filled with each VM's own alarm variables (perfmon's <config> in its
        metadata), by lower-case UUID, for the alarms to watch; ALARMS: a VM's variables
        with their origins, for policy.json."""
        self._vms = vms
        self._vm_alarms = vm_alarms
        self._perfmon_seen: Dict[str, bytes | None] = {}
        self._host = host
        self._state_dir = state_dir
        self._timeout = timeout
        self._wall = wall
        self._alarms = alarms
        self.book: MetadataBook | None = None
        if config.metadata and host is not None:
            self.book = MetadataBook(refresh=config.refresh, reader=self._read, clock=clock)
        self.view = PolicyView(config, self.book)
        self._watched: Any = None  # the connection our metadata-change callback is on
        self._callback: int | None = None
        self._written: bytes | None = None
        self._pending: asyncio.Future[Any] | None = None

    # --- on the libvirt worker ---------------------------------------------------------

    def _read(self, vm: VM) -> bytes | None:
        conn = self._host.read_only()
        if conn is None:
            raise RuntimeError("libvirt is not reachable")
        return read_domain(conn, vm, self._host.module())

    def _refresh(self, vms: Sequence[VM]) -> bool:
        assert self.book is not None
        self._host.enable_events()
        self._watch()
        return self.book.update(vms)

    def _watch(self) -> None:
        """Register for metadata-change events on the connection in force (once per connection)."""
        conn = self._host.read_only()
        if conn is None or conn is self._watched or not events_running():
            return
        libvirt = self._host.module()
        book = self.book
        assert book is not None

        def changed(_conn: Any, dom: Any, _type: int, uri: str | None, _opaque: Any) -> None:
            if uri in (None, NAMESPACE):
                book.changed(dom.UUIDString())

        try:
            self._callback = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, changed, None)
            self._watched = conn
        except Exception as err:  # an old libvirtd: the refresh period alone then
            log.info("metadata-change events unavailable (%s): metadata re-read every %d s",
                     err, book.refresh)
            self._watched = conn

    # --- the step ------------------------------------------------------------------------

    async def observe(self, stats: Any) -> None:
        """Read the metadata that is due; write policy.json when a policy changed."""
        vms = list(self._vms())
        if self.book is not None:
            if self._pending is not None and not self._pending.done():
                return  # the worker is still in the previous read
            self._pending = asyncio.ensure_future(self._host.call(self._refresh, vms))
            done, _ = await asyncio.wait({self._pending}, timeout=self._timeout)
            if done:
                try:
                    self._pending.result()
                except Exception as err:  # libvirt away: the policies read before stay
                    log.debug("domain metadata not read: %s", err)
            else:
                self._pending.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._alarm_variables(vms)
        self._write(vms)

    def _alarm_variables(self, vms: Sequence[VM]) -> None:
        """Each VM's perfmon <config> from its metadata, parsed once per content."""
        if self._vm_alarms is None or self.book is None:
            return
        running = {vm.uuid.lower(): vm for vm in vms}
        for uuid in [u for u in self._perfmon_seen if u not in running]:
            del self._perfmon_seen[uuid]
            self._vm_alarms.pop(uuid, None)
        for uuid, vm in running.items():
            policy = self.book.policy(uuid)
            raw = policy.perfmon if policy is not None else None
            if uuid in self._perfmon_seen and self._perfmon_seen[uuid] == raw:
                continue
            self._perfmon_seen[uuid] = raw
            if raw is None:
                self._vm_alarms.pop(uuid, None)
                continue
            from vhostmd_py.config.perfmon import parse_perfmon_config

            where = f"metadata of VM {vm.name!r} ({vm.uuid})"
            try:
                found = parse_perfmon_config(raw, where=where, context="vm")
            except VhostmdError as err:
                log.error("alarms in the %s ignored: %s", where, err)
                self._vm_alarms.pop(uuid, None)
                continue
            self._vm_alarms[uuid] = tuple(found.variables)
            log.info("alarms in the %s: %s", where,
                     ", ".join(v.name for v in found.variables) or "none")

    def _write(self, vms: Sequence[VM]) -> None:
        if self._state_dir is None:
            return
        table = self.view.table(vms)
        if self._alarms is not None:
            for vm in vms:
                table[vm.uuid]["alarms"] = self._alarms(vm)
        content = json.dumps(table, sort_keys=True).encode()
        if content == self._written:
            return
        from vhostmd_py.fs import write_json_atomic

        try:
            write_json_atomic(os.path.join(self._state_dir, POLICY_FILE),
                              {"version": 1, "written": self._wall(), "vms": table})
        except VhostmdError as err:
            log.error("policy state not written: %s", err)
            return
        self._written = content

    def decorate(self, snapshot: Snapshot) -> Snapshot:
        """SNAPSHOT with the policies in force attached (the publishers apply them)."""
        return replace(snapshot, view=self.view)

    def reconfigure(self, config: Any) -> bool:
        """A changed <policy> is a new step (its metadata is read again)."""
        return bool(config.policy == self.view.config)

    def close(self) -> None:
        """Stop listening to libvirt's events."""
        conn, self._watched = self._watched, None
        if conn is not None and self._callback is not None:
            with contextlib.suppress(Exception):
                conn.domainEventDeregisterAny(self._callback)
        self._callback = None
