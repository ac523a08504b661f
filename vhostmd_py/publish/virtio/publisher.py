"""The virtio transport as a publisher of the daemon (vhostmd_py.assemble.Publisher).

VirtioServer serves the channels; this hands it each cycle's snapshot and
tells the daemon whether a reloaded config can keep it (the same <virtio>
settings) or needs it restarted.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from vhostmd_py.cycle.snapshot import Snapshot

if TYPE_CHECKING:
    from vhostmd_py.publish.virtio.server import VirtioServer

log = logging.getLogger(__name__)


class VirtioPublisher:
    """One running VirtioServer and the settings it was started with."""

    where = "virtio"  # for the daemon's first-publish line

    def __init__(self, server: VirtioServer, settings: Any) -> None:
        self.server = server
        self.settings = settings

    @classmethod
    async def start(cls, settings: Any, *, clock: Callable[[], float],
                    reserve_fds: int) -> VirtioPublisher:
        """Start serving SETTINGS' channels (OSError, VhostmdError when impossible)."""
        from vhostmd_py.publish.virtio.server import VirtioServer

        server = VirtioServer(settings, clock=clock, reserve_fds=reserve_fds)
        await server.start()
        log.info(
            "Activating virtio, using max_channels %d, expiration_time %d",
            settings.max_channels,
            settings.expiration_time,
        )
        return cls(server, settings)

    @property
    def connections(self) -> int:
        """Channels with an open connection."""
        return self.server.connections

    def publish(self, snapshot: Snapshot, *, listed: bool = True) -> bool:
        """Serve SNAPSHOT from now on (always succeeds: guests ask when they want)."""
        self.server.update(snapshot)
        return True

    def reconfigure(self, config: Any) -> bool:
        """Whether CONFIG's <virtio> settings are the ones in force (else: restart)."""
        return bool(config.virtio == self.settings)

    async def close(self) -> None:
        """Stop discovery, close every channel."""
        await self.server.close()
