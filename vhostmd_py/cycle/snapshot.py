"""One cycle's rendered metrics: the host part and each VM's block.

The collector produces a Snapshot each cycle; the transports (vbd disk,
virtio channels) only ever read Snapshots, so a metric's source and its
rendering never depend on how it is published. The bytes around them (the
document's head and tail, the virtio reply) are vhostmd_py.cycle.render's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Tuple

from vhostmd_py.sources.vm import VM


@dataclass(frozen=True)
class VmBlock:
    """One VM's rendered <metric> elements for a cycle (may be empty)."""

    vm: VM
    xml: bytes


class View(Protocol):
    """What each VM may see of a snapshot (vhostmd_py.publish.policy's PolicyView)."""

    def shared(self, snapshot: Snapshot) -> Snapshot:
        """What the shared disk, read by every VM, may hold."""

    def for_vm(self, snapshot: Snapshot, vm: VM) -> Snapshot | None:
        """What VM's own disk or channel may hold; None when the VM is blocked."""


@dataclass(frozen=True)
class Snapshot:
    """All rendered metrics of one cycle, in upstream's document order.

    VIEW, when a policy is configured, says what each transport may show of
    it (the publishers apply it); None: everything, as upstream.
    """

    host: bytes
    vms: Tuple[VmBlock, ...]
    view: View | None = field(default=None, compare=False, repr=False)
