"""The shared metrics disk as a publisher of the daemon (transport "vbd").

vhostmd_py.publish.mdisk.MetricsDisk is the disk itself (the format, file
safety, locking); this wraps it in the daemon's publisher protocol
(vhostmd_py.assemble.Publisher): one document per cycle, upstream's error
line when it does not fit, and the daemon's publish health.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from vhostmd_py.cycle import render
from vhostmd_py.cycle.snapshot import Snapshot
from vhostmd_py.errors import ContentTooLargeError, VhostmdError

if TYPE_CHECKING:
    from vhostmd_py.config import Config
    from vhostmd_py.publish.mdisk import MetricsDisk

log = logging.getLogger(__name__)


class VbdPublisher:
    """One metrics disk, written with each cycle's whole document."""

    def __init__(self, disk: MetricsDisk) -> None:
        self.disk = disk
        self._published_any = False

    @classmethod
    def create(cls, config: Config,
               factory: Callable[[str, int], MetricsDisk] | None = None) -> VbdPublisher:
        """Create CONFIG's disk (DiskError when impossible, e.g. after -u USER)."""
        if factory is None:
            from vhostmd_py.publish.mdisk import MetricsDisk

            factory = MetricsDisk.create
        # (config.py already warns about a disk too small for upstream's reader.)
        disk = factory(config.disk_path, config.disk_size)
        log.info("Using metrics disk path %s", config.disk_path)
        log.info("Using metrics disk size %d", config.disk_size)
        return cls(disk)

    @property
    def where(self) -> str:
        """For the daemon's first-publish line."""
        return f"disk {self.disk.path}"

    def publish(self, snapshot: Snapshot, *, listed: bool = True) -> bool:
        """Write SNAPSHOT's document; False when it failed (logged)."""
        try:
            # With a policy, the shared disk holds what every VM may see.
            shown = snapshot if snapshot.view is None else snapshot.view.shared(snapshot)
            self.disk.publish(render.document(shown))
        except ContentTooLargeError as err:
            # Upstream's wording, every cycle; the previous document stays readable.
            log.error(
                "Metrics data is larger than metrics disk (%d bytes, the disk holds %d)",
                err.length,
                err.capacity,
            )
            if not self._published_any:
                # Nothing was ever published: the disk still has busy=1 from its
                # creation, which hangs every upstream reader for as long as we run
                # (upstream's own bug, tests/data/golden/upstream/FACTS.md). An empty
                # document clears it.
                self._publish_empty()
            return False
        except VhostmdError as err:
            log.error("Unable to publish metrics: %s", err)
            return False
        self._published_any = True
        return True

    def _publish_empty(self) -> None:
        try:
            self.disk.publish(render.EMPTY_DOCUMENT)
        except VhostmdError as err:
            log.error("Unable to publish an empty metrics document: %s", err)
        else:
            self._published_any = True

    def reconfigure(self, config: Config) -> bool:
        """Take CONFIG in place when its disk is this one: a new size is a resize.

        False: another path, a new disk is needed. Raises VhostmdError when
        the resize is refused (no room): the new config is then refused.
        """
        if config.disk_path != self.disk.path:
            return False
        if config.disk_size != self.disk.size:
            # Same file, new size: resized in place (our own lock is on it, a
            # second open would conflict with it), refused when there is no room.
            self.disk.resize(config.disk_size)
        return True

    def close(self) -> None:
        """Close the disk (clears busy if nothing was ever published)."""
        self.disk.close()
