"""The virtio-serial server: runs the channels on the daemon's loop; fd limits.

The daemon is the CLIENT of QEMU's per-VM listening socket: the guest writes
``GET /metrics/XML\\n\\n`` into its port and reads back the document of
the host metrics and its own VM metrics (FACTS.md section 4). This module ties
the parts together and decides when to look and to connect:
- vhostmd_py.publish.virtio.channels: which VMs have a channel, expiry;
- vhostmd_py.publish.virtio.discovery: where each VM's socket is;
- vhostmd_py.publish.virtio.connect: one connect attempt, its back-off;
- vhostmd_py.publish.virtio.channel_io: reads and replies, the loop share;
- vhostmd_py.publish.virtio.protocol: what is said on a connection.

Everything runs on the daemon's asyncio loop with non-blocking sockets and
``loop.add_reader``/``add_writer`` callbacks: no thread and no task per VM,
so one slow or hostile guest can never hold up another guest or the disk.

Deliberate differences from upstream (docs/COMPATIBILITY.md, virtio-serial), besides
discovery's:
- a socket is reconnected as soon as QEMU recreates it;
- a request of 511 bytes without a terminator gets ``INVALID REQUEST`` and
  the channel keeps working (upstream stops answering it and spins a CPU);
- the "too many VMs" error is logged once per VM, not every cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import time
from typing import Callable, List, Protocol

from vhostmd_py.cycle.snapshot import Snapshot
from vhostmd_py.publish.virtio.channel_io import ChannelIO
from vhostmd_py.publish.virtio.channels import Channel, ChannelTable
from vhostmd_py.publish.virtio.connect import Connector
from vhostmd_py.publish.virtio.discovery import ChannelDiscovery, Entries

logger = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL = 0.05
# While guests keep the loop busy (say 1000 guests requesting in a closed
# loop), channel I/O may take at most IO_SHARE of each IO_WINDOW seconds of
# the event loop, so the metrics cycle and the disk publish always get the
# rest (loop turns, and the GIL for the action-spawning threads); channels
# over budget wait their turn in FIFO order (ChannelIO). Upstream serves
# virtio in a thread of its own; we share one loop, so the share must be
# bounded.
IO_SHARE = 0.5
IO_WINDOW = 0.1
# File descriptors we keep free beyond one per channel and the action
# runner's own need (libvirt, the disk, logging, inotify).
FD_HEADROOM = 256


class VirtioSettings(Protocol):
    """What the server needs from config.VirtioConfig (structural, so no import cycle)."""

    @property
    def channel_path(self) -> str: ...

    @property
    def max_channels(self) -> int: ...

    @property
    def expiration_time(self) -> int: ...


def raise_fd_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit to NEEDED (at most the hard limit); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    new = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    if new > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (OSError, ValueError) as err:
            # Refused (a sandbox): the transport still starts, with the
            # channels the current limit allows (said below).
            logger.debug("cannot raise the open file limit to %d: %s", new, err)
            new = soft
    if new < needed:
        logger.warning(
            "open file limit %d is below the %d that max_channels needs; "
            "some channels may fail to connect (raise LimitNOFILE)",
            new,
            needed,
        )
    return new


class VirtioServer:
    """Serves the latest Snapshot to every running VM over its virtio-serial channel."""

    def __init__(
        self,
        cfg: VirtioSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        use_inotify: bool = True,
        reserve_fds: int = 0,
    ) -> None:
        """RESERVE_FDS: descriptors others in the process need at once (the
        action runner's fd_need), kept free beside one per channel."""
        self._reserve_fds = reserve_fds
        self._max = int(cfg.max_channels)
        self._clock = clock
        self._poll = poll_interval
        self._table = ChannelTable(self._max, float(cfg.expiration_time))
        self._connector = Connector(poll_interval)
        self._io = ChannelIO(lost=self._disconnect, share=IO_SHARE, window=IO_WINDOW)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._discovery = ChannelDiscovery(
            cfg.channel_path, poll_interval=poll_interval, use_inotify=use_inotify
        )
        self.scans = 0  # full discovery passes so far (tests, bench)

    # --- the daemon's interface ------------------------------------------------

    async def start(self) -> None:
        """Start discovery and I/O on the running loop."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._io.attach(self._loop)
        # One descriptor per channel: 1024 channels do not fit the usual
        # soft limit of 1024 (the daemon logs "Activating virtio ...").
        raise_fd_limit(self._max + FD_HEADROOM + self._reserve_fds)
        self._discovery.start(self._loop, self._discover)
        self._task = self._loop.create_task(self._run(), name="vhostmd-virtio")

    def update(self, snapshot: Snapshot) -> None:
        """Take a cycle's metrics: add, refresh and drop channels; connect new ones at once.

        With a policy (SNAPSHOT.view) each channel serves what its VM may see.
        """
        if self._closed:
            return
        now = self._clock()
        self._io.host = snapshot.host
        for old in self._table.stale(snapshot):
            self._remove(old, "VM no longer running")
        if self._table.take(snapshot, now) and self._loop is not None:
            self._discover()

    async def close(self) -> None:
        """Stop discovery and close every channel."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for ch in list(self._table.channels.values()):
            self._remove(ch, "virtio transport stopped")
        self._io.close()
        self._discovery.stop()

    # --- introspection (tests, bench, status) -------------------------------------

    @property
    def connections(self) -> int:
        """Channels with an open connection."""
        return self._table.connections

    def channel_ids(self) -> List[int]:
        """Ids of the VMs that have a channel, in the order they got it."""
        return list(self._table.channels)

    def connected_path(self, vm_id: int) -> str | None:
        """The socket path this VM's channel is connected to, if it is."""
        ch = self._table.channels.get(vm_id)
        if ch is None or ch.sock is None:
            return None
        name = ch.sock.getpeername()
        return name if isinstance(name, str) else os.fsdecode(name)

    # --- the periodic tick ---------------------------------------------------------

    def _remove(self, ch: Channel, reason: str) -> None:
        if ch.sock is not None:
            self._disconnect(ch, reason)
        self._table.drop(ch, reason)

    def _expire(self, now: float) -> None:
        for ch in self._table.expired(now):
            logger.debug("Expire channel '%s'", ch.label)
            self._remove(ch, f"no metrics for {self._table.expiration:g} s")

    async def _run(self) -> None:
        assert self._loop is not None
        due = self._loop.time()
        while True:
            lag = self._loop.time() - due
            if lag > 4 * self._poll:
                # Connect latency is bounded by the loop's responsiveness: say
                # when something else (a long cycle's work) held the loop.
                logger.debug("virtio discovery ran %.3f s late (event loop busy)", lag)
            try:
                now = self._clock()
                self._expire(now)
                if self._discovery.scan_due(now):
                    self._discover()
                else:
                    self._retry_due(now)
            except Exception:  # the transport must outlive any one bad tick
                logger.exception("virtio discovery failed")
            due = self._loop.time() + self._poll
            await asyncio.sleep(self._poll)

    # --- discovery and connect -------------------------------------------------------

    def _retry_due(self, now: float) -> None:
        for ch in list(self._table.channels.values()):
            if ch.sock is None and ch.retry_path is not None and ch.retry_at <= now:
                self._try_connect(ch, ch.retry_path, now)

    def _discover(self) -> None:
        """A full pass: find and try the socket of every channel not connected."""
        if self._loop is None:
            return
        now = self._clock()
        self._discovery.begin_pass(now)
        pending = [ch for ch in self._table.channels.values() if ch.sock is None]
        if not pending:
            return
        self.scans += 1
        self._discovery.watch_root()
        # One listing of channel_path per pass, made only if a VM needs it.
        listing: List[Entries] = []

        def entries() -> Entries:
            if not listing:
                listing.append(self._discovery.scan())
            return listing[0]

        for ch in pending:
            for path in self._discovery.socket_paths(ch.vm, entries):
                if self._try_connect(ch, path, now):
                    break

    def _try_connect(self, ch: Channel, path: bytes, now: float) -> bool:
        if not self._connector.connect(ch, path, now):
            return False
        self._table.connections += 1
        self._io.watch(ch)
        logger.info("Opened channel '%s' (%s)", ch.label, self._table.counts())
        return True

    def _disconnect(self, ch: Channel, reason: str) -> None:
        sock, ch.sock = ch.sock, None
        if sock is None:
            return
        self._io.unwatch(sock)
        sock.close()
        self._table.connections -= 1
        self._connector.disconnected(ch, self._clock())
        logger.info("Closed channel '%s' (%s): %s", ch.label, self._table.counts(), reason)
