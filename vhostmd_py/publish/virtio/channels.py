"""The virtio channels: which VMs have one, and each one's last metrics.

Bookkeeping only, no socket is opened here (vhostmd_py.publish.virtio.connect
does that, vhostmd_py.publish.virtio.channel_io talks on it): a VM gets a
channel once a cycle gives it VM metrics, at most max_channels of them (the
rest are refused, said once per VM), and loses it when it stops running or
its metrics stop coming for expiration_time (upstream's vio_expire).
"""

from __future__ import annotations

import logging
import socket
from typing import Dict, List, Set, Tuple

from vhostmd_py.cycle.snapshot import Snapshot
from vhostmd_py.publish.virtio.protocol import Exchange
from vhostmd_py.sources.vm import VM

logger = logging.getLogger(__name__)


class Channel:
    """One VM's channel: its last metrics and, when connected, its socket state."""

    __slots__ = (
        "backoff",
        "block",
        "blocked",
        "connected_at",
        "exchange",
        "failed_ident",
        "host",
        "paused",
        "retry_at",
        "retry_path",
        "sock",
        "updated",
        "vm",
        "warned",
    )

    def __init__(self, vm: VM, block: bytes, now: float) -> None:
        self.vm = vm
        self.block = block
        # With a policy (Snapshot.view): the host part this VM may see, and
        # whether it is blocked (answered the protocol's error). None: the server's.
        self.host: bytes | None = None
        self.blocked = False
        self.updated = now
        self.sock: socket.socket | None = None
        self.connected_at = 0.0
        self.exchange = Exchange()
        self.paused = False
        # Connect retry state: the socket (st_dev, st_ino) that last failed us
        # and when to try it again.
        self.failed_ident: Tuple[int, int] | None = None
        self.retry_at = 0.0
        self.backoff = 0.0
        # The socket to retry on a timer (refused, or QEMU dropped us): no
        # directory event tells us when QEMU listens again.
        self.retry_path: bytes | None = None
        self.warned: Set[int] = set()

    @property
    def label(self) -> str:
        """Upstream's '<id> <name>' in log lines."""
        return f"{self.vm.id} {self.vm.name}"


def same_vm(a: VM, b: VM) -> bool:
    """Same domain (an id recycled by another VM is a different one)."""
    return a.id == b.id and a.uuid == b.uuid and a.name == b.name


def _key(vm: VM) -> Tuple[int, str, str]:
    return (vm.id, vm.name, vm.uuid)


class ChannelTable:
    """The channels by VM id, in the order they were added, and the open-connection count."""

    def __init__(self, max_channels: int, expiration: float) -> None:
        self.max = max_channels
        self.expiration = expiration
        self.channels: Dict[int, Channel] = {}
        self.connections = 0  # kept by whoever opens and closes the sockets
        self._refused: Set[Tuple[int, str, str]] = set()

    def counts(self) -> str:
        """Upstream's (connections/channels/max_channels)."""
        return f"{self.connections}/{len(self.channels)}/{self.max}"

    def stale(self, snapshot: Snapshot) -> List[Channel]:
        """The channels whose VM SNAPSHOT no longer has running (to remove first)."""
        running = {block.vm.id: block for block in snapshot.vms}
        # A VM that is no longer running gets nothing more, at once; an id
        # now used by another domain is a different VM.
        gone = []
        for vm_id, old in self.channels.items():
            current = running.get(vm_id)
            if current is None or not same_vm(current.vm, old.vm):
                gone.append(old)
        return gone

    def take(self, snapshot: Snapshot, now: float) -> bool:
        """Add and refresh the channels of SNAPSHOT's VMs; whether one was added."""
        added = False
        for block in snapshot.vms:
            # Like upstream, a VM gets a channel once it has vm metrics; an
            # empty block leaves the last one in place until it expires.
            if not block.xml:
                continue
            ch = self.channels.get(block.vm.id)
            if ch is None:
                if len(self.channels) >= self.max:
                    self._refuse(block.vm)
                    continue
                ch = Channel(block.vm, block.xml, now)
                self.channels[block.vm.id] = ch
                self._refused.discard(_key(block.vm))
                added = True
                logger.info("Added channel '%s' (%s)", ch.label, self.counts())
            else:
                ch.block = block.xml
                ch.vm = block.vm  # the live XML's channel path may have changed
                ch.updated = now
            if snapshot.view is not None:
                _apply_view(ch, snapshot, block.vm)
        self._refused &= {_key(block.vm) for block in snapshot.vms}
        return added

    def _refuse(self, vm: VM) -> None:
        key = _key(vm)
        if key in self._refused:
            return
        # Upstream's wording; it repeats it every cycle, we say it once per VM.
        self._refused.add(key)
        logger.error(
            "Could not add channel '%d %s' - too many VMs (%s)", vm.id, vm.name, self.counts()
        )

    def expired(self, now: float) -> List[Channel]:
        """The channels without metrics for expiration_time (to remove)."""
        # Upstream vio_expire: no metrics for expiration_time -> closed;
        # until then the guest keeps getting the last block (FACTS.md section 4).
        return [ch for ch in self.channels.values() if now - ch.updated > self.expiration]

    def drop(self, ch: Channel, reason: str) -> None:
        """Forget CH (its socket already closed)."""
        self.channels.pop(ch.vm.id, None)
        logger.info("Removed channel '%s' (%s): %s", ch.label, self.counts(), reason)


def _apply_view(ch: Channel, snapshot: Snapshot, vm: VM) -> None:
    """What CH's VM may see of SNAPSHOT, by its policy (SNAPSHOT.view)."""
    assert snapshot.view is not None
    seen = snapshot.view.for_vm(snapshot, vm)
    ch.blocked = seen is None
    if seen is not None:
        ch.host = seen.host
        ch.block = b"".join(b.xml for b in seen.vms)
