"""One metrics disk per running VM (vhostmd-py extension, <disk_per_vm/>; docs/LIBVIRT.md).

Each running VM gets a disk of its own at the configured pattern, the UUID
in place of %u (never the name: whoever defines a domain chooses its name,
and it must never reach a path). Same mvbd format as the shared disk; its
document is the host's metrics and that VM's block only, chosen by UUID,
so a per-VM disk can never receive another VM's metrics.

Life of a disk: the libvirt qemu hook (conf/libvirt-hook-qemu) creates it
empty at the domain's `prepare` phase, before QEMU opens it; each cycle we
open it (creating it for VMs started before the daemon) and publish; when
the VM is no longer listed we stop publishing, and after `grace` seconds
(a restart or a migration back must not race the removal) we close it and
remove the file if it is still ours. The hook also removes it at `release`.
At daemon stop the disks are closed, not removed: the guests keep the last
document and the next daemon takes them over.

The directory must be the daemon's (root's) and writable by nobody else:
/dev/shm is world-writable, and a directory someone else owns would let them
swap our files under us (the openat walk of vhostmd_py.publish.diskfile
refuses planted symlinks anyway).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import time
from typing import TYPE_CHECKING, Any, Callable, Dict

from vhostmd_py.config import PerVmDiskConfig
from vhostmd_py.cycle.render import EMPTY_DOCUMENT, document
from vhostmd_py.cycle.snapshot import Snapshot
from vhostmd_py.errors import ContentTooLargeError, DiskIOError, VhostmdError
from vhostmd_py.publish import diskfile

if TYPE_CHECKING:  # the C binding is imported only when a disk is written
    from vhostmd_py.publish.mdisk import MetricsDisk

log = logging.getLogger(__name__)

# libvirt's canonical form; anything else never becomes a path.
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def check_directory(directory: str, *, create: bool = True) -> None:
    """Make sure DIRECTORY exists, is ours (or root's) and writable by nobody else.

    Created 0755 when missing (only its last component, as the shared disk's).
    """
    st = diskfile.directory_stat(directory, create=create)
    if st.st_uid not in (0, os.geteuid()):
        raise DiskIOError(directory, f"per-VM disk directory is owned by uid {st.st_uid}, "
                          "not by root or us: refusing it", errno.EPERM)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise DiskIOError(directory, "per-VM disk directory is writable by group or others "
                          f"(mode {stat.S_IMODE(st.st_mode):04o}): refusing it", errno.EPERM)


class PerVmDisks:
    """The open per-VM disks, keyed by UUID."""

    def __init__(self, config: PerVmDiskConfig, *, max_disks: int,
                 clock: Callable[[], float] = time.monotonic,
                 disk_factory: Callable[[str, int], MetricsDisk] | None = None) -> None:
        self.config = config
        self.max_disks = max_disks
        self._clock = clock
        self._factory = disk_factory
        self._disks: Dict[str, MetricsDisk] = {}
        self._published: Dict[str, bool] = {}  # uuid -> a publish ever succeeded
        self._gone_since: Dict[str, float] = {}
        self._said: Dict[str, str] = {}  # uuid -> last problem logged (said once)

    @property
    def uuids(self) -> tuple[str, ...]:
        """The UUIDs whose disks are open (published or within their grace)."""
        return tuple(self._disks)

    def open(self) -> None:
        """Check (and create) the directory: at start-up, before privileges are dropped."""
        check_directory(self.config.directory)

    def _say(self, uuid: str, problem: str) -> None:
        if self._said.get(uuid) != problem:
            log.error("%s", problem)
            self._said[uuid] = problem

    def _create(self, uuid: str) -> MetricsDisk | None:
        factory = self._factory
        if factory is None:
            from vhostmd_py.publish.mdisk import MetricsDisk

            factory = MetricsDisk.create
        path = self.config.path_for(uuid)
        try:
            check_directory(self.config.directory)
            disk = factory(path, self.config.size)
        except VhostmdError as err:
            self._say(uuid, f"per-VM metrics disk of VM {uuid}: {err}")
            return None
        log.info("Per-VM metrics disk %s opened", path)
        return disk

    def publish(self, snapshot: Snapshot, *, listed: bool = True) -> None:
        """Publish host + each VM's own block to its disk; retire the disks of gone VMs.

        LISTED: whether snapshot.vms is libvirt's real answer. When libvirt did
        not answer, no VM counts as gone (their disks must not be removed
        while QEMU still reads them).
        """
        now = self._clock()
        running = {}
        for block in snapshot.vms:
            uuid = block.vm.uuid
            if not UUID.match(uuid):
                self._say(uuid, f"VM {block.vm.name!r}: UUID {uuid!r} is not in canonical form: "
                          "no per-VM disk")
                continue
            running[uuid] = block
        for uuid, block in running.items():
            self._gone_since.pop(uuid, None)
            disk = self._disks.get(uuid)
            if disk is None:
                if len(self._disks) >= self.max_disks:
                    self._say(uuid, f"per-VM metrics disk of VM {uuid}: already "
                              f"{self.max_disks} disks open (max_channels)")
                    continue
                disk = self._create(uuid)
                if disk is None:
                    continue
                self._disks[uuid] = disk
                self._published[uuid] = False
            # Host metrics and THIS VM's block, chosen by the key we publish under;
            # with a policy, what this VM may see (a blocked VM: an empty document).
            if snapshot.view is None:
                content = document(Snapshot(snapshot.host, (block,)))
            else:
                seen = snapshot.view.for_vm(Snapshot(snapshot.host, (block,)), block.vm)
                content = EMPTY_DOCUMENT if seen is None else document(seen)
            self._publish_one(uuid, disk, content)
        if not listed:
            return
        for uuid in [u for u in self._disks if u not in running]:
            since = self._gone_since.setdefault(uuid, now)
            if now - since >= self.config.grace:
                self._retire(uuid)

    def _publish_one(self, uuid: str, disk: MetricsDisk, content: bytes) -> None:
        try:
            disk.publish(content)
        except ContentTooLargeError as err:
            self._say(uuid, f"Metrics data is larger than the per-VM metrics disk {disk.path} "
                      f"({err.length} bytes, the disk holds {err.capacity})")
            if not self._published[uuid]:
                try:  # clear the creation's busy flag (upstream readers would hang)
                    disk.publish(EMPTY_DOCUMENT)
                    self._published[uuid] = True
                except VhostmdError as empty_err:
                    log.error("%s", empty_err)
            return
        except VhostmdError as err:
            self._say(uuid, f"Unable to publish metrics to {disk.path}: {err}")
            return
        self._published[uuid] = True
        if uuid in self._said:
            del self._said[uuid]

    def _retire(self, uuid: str) -> None:
        """Close a gone VM's disk and remove its file if the path still names it."""
        disk = self._disks.pop(uuid)
        self._gone_since.pop(uuid, None)
        self._published.pop(uuid, None)
        self._said.pop(uuid, None)
        try:
            ours = diskfile.names_file(disk.path, disk.fileno())
        except VhostmdError as err:
            log.warning("per-VM metrics disk %s: %s", disk.path, err)
            ours = False
        if ours:
            try:
                diskfile.unlink(disk.path)
            except VhostmdError as err:
                log.warning("per-VM metrics disk %s: %s", disk.path, err.reason)
        disk.close()
        log.info("Per-VM metrics disk %s of a gone VM closed%s", disk.path,
                 " and removed" if ours else "")

    # --- a publisher of the daemon (vhostmd_py.assemble.Publisher) -------------------

    where = None  # not in the daemon's first-publish line, nor in its publish health

    def reconfigure(self, config: Any) -> bool:
        """Whether CONFIG's <disk_per_vm> (and channel limit) are the ones in force."""
        return bool(config.disk_per_vm == self.config
                    and config.virtio.max_channels == self.max_disks)

    def close(self) -> None:
        """Close every disk, leaving the files (daemon stop, reload)."""
        disks, self._disks = self._disks, {}
        self._gone_since.clear()
        self._published.clear()
        for disk in disks.values():
            disk.close()
