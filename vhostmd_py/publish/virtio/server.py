"""The virtio-serial server: channels per VM, connect back-off, the I/O loop, fd limits.

The daemon is the CLIENT of QEMU's per-VM listening socket: the guest writes
``GET /metrics/XML\\n\\n`` into its port and reads back the document of
the host metrics and its own VM metrics (FACTS.md section 4). Where the sockets
are is vhostmd_py.publish.virtio.discovery's; what is said on them is
vhostmd_py.publish.virtio.protocol's; this module connects, schedules and sends.

Everything runs on the daemon's asyncio loop with non-blocking sockets and
``loop.add_reader``/``add_writer`` callbacks: no thread and no task per VM,
so one slow or hostile guest can never hold up another guest or the disk.
Per channel we keep at most one request buffer (< 512 bytes) and one reply
in flight, sent with sendmsg() straight from the cycle's shared host bytes
and the VM's own block (no per-channel copy of the host part, which 1000
stuck guests would otherwise each hold); while a reply is not drained we
stop reading that guest, so a guest that floods requests without reading
is served at the rate it reads and its surplus stays in the kernel's
(bounded) socket buffer.

Deliberate differences from upstream (docs/COMPATIBILITY.md, virtio-serial), besides
discovery's:
- a socket is reconnected as soon as QEMU recreates it;
- a request of 511 bytes without a terminator gets ``INVALID REQUEST`` and
  the channel keeps working (upstream stops answering it and spins a CPU);
- the "too many VMs" error is logged once per VM, not every cycle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import logging
import os
import resource
import socket
import stat
import struct
import termios
import time
from typing import Callable, Dict, List, Protocol, Sequence, Set, Tuple

from vhostmd_py.cycle.snapshot import Snapshot
from vhostmd_py.publish.virtio.discovery import ChannelDiscovery, Entries
from vhostmd_py.publish.virtio.protocol import Exchange, Request, reply_to
from vhostmd_py.sources.vm import VM

logger = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL = 0.05
# A socket that refuses us is retried with a growing delay (same inode), so
# 1000 stale sockets do not cost 20000 connect() calls a second; a recreated
# socket (new inode) is tried at once.
MAX_RETRY_DELAY = 1.0
# A connection that QEMU drops sooner than this counts as a failure for the
# retry delay, so a peer that accepts and closes at once is not hammered.
MIN_HEALTHY_LIFETIME = 1.0
# While guests keep the loop busy (say 1000 guests requesting in a closed
# loop), channel I/O may take at most IO_SHARE of each IO_WINDOW seconds of
# the event loop, so the metrics cycle and the disk publish always get the
# rest (loop turns, and the GIL for the action-spawning threads); channels
# over budget wait their turn in FIFO order. Upstream serves virtio in a
# thread of its own; we share one loop, so the share must be bounded.
IO_SHARE = 0.5
IO_WINDOW = 0.1
# File descriptors we keep free beyond one per channel and the action
# runner's own need (libvirt, the disk, logging, inotify).
FD_HEADROOM = 256

# Errors expected while a VM starts, stops or restarts: logged at DEBUG only.
_QUIET_CONNECT_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN, errno.ECONNRESET, errno.ENOTDIR}
)


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


class _Channel:
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


def _same_vm(a: VM, b: VM) -> bool:
    """Same domain (an id recycled by another VM is a different one)."""
    return a.id == b.id and a.uuid == b.uuid and a.name == b.name


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
        self._expiration = float(cfg.expiration_time)
        self._clock = clock
        self._poll = poll_interval
        self._host = b""
        self._channels: Dict[int, _Channel] = {}
        self._refused: Set[Tuple[int, str, str]] = set()
        self._connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # Loop-share accounting of channel I/O (IO_SHARE), measured with
        # perf_counter: it is CPU cost, not a time the protocol depends on.
        self._io_window_start = 0.0
        self._io_busy = 0.0
        self._paused: collections.deque[_Channel] = collections.deque()
        self._resume_handle: asyncio.TimerHandle | None = None
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
        self._host = snapshot.host
        running = {block.vm.id: block for block in snapshot.vms}
        # A VM that is no longer running gets nothing more, at once; an id
        # now used by another domain is a different VM.
        for vm_id, old in list(self._channels.items()):
            current = running.get(vm_id)
            if current is None or not _same_vm(current.vm, old.vm):
                self._remove(old, "VM no longer running")
        added = False
        for block in snapshot.vms:
            # Like upstream, a VM gets a channel once it has vm metrics; an
            # empty block leaves the last one in place until it expires.
            if not block.xml:
                continue
            ch = self._channels.get(block.vm.id)
            if ch is None:
                if len(self._channels) >= self._max:
                    self._refuse(block.vm)
                    continue
                ch = _Channel(block.vm, block.xml, now)
                self._channels[block.vm.id] = ch
                self._refused.discard(self._key(block.vm))
                added = True
                logger.info("Added channel '%s' (%s)", ch.label, self._counts())
            else:
                ch.block = block.xml
                ch.vm = block.vm  # the live XML's channel path may have changed
                ch.updated = now
            if snapshot.view is not None:
                _apply_view(ch, snapshot, block.vm)
        self._refused &= {self._key(block.vm) for block in snapshot.vms}
        if added and self._loop is not None:
            self._discover()

    async def close(self) -> None:
        """Stop discovery and close every channel."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for ch in list(self._channels.values()):
            self._remove(ch, "virtio transport stopped")
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        self._paused.clear()
        self._discovery.stop()

    # --- introspection (tests, bench, status) -------------------------------------

    @property
    def connections(self) -> int:
        """Channels with an open connection."""
        return self._connections

    def channel_ids(self) -> List[int]:
        """Ids of the VMs that have a channel, in the order they got it."""
        return list(self._channels)

    def connected_path(self, vm_id: int) -> str | None:
        """The socket path this VM's channel is connected to, if it is."""
        ch = self._channels.get(vm_id)
        if ch is None or ch.sock is None:
            return None
        name = ch.sock.getpeername()
        return name if isinstance(name, str) else os.fsdecode(name)

    # --- channel bookkeeping -----------------------------------------------------------

    @staticmethod
    def _key(vm: VM) -> Tuple[int, str, str]:
        return (vm.id, vm.name, vm.uuid)

    def _counts(self) -> str:
        """Upstream's (connections/channels/max_channels)."""
        return f"{self._connections}/{len(self._channels)}/{self._max}"

    def _refuse(self, vm: VM) -> None:
        key = self._key(vm)
        if key in self._refused:
            return
        # Upstream's wording; it repeats it every cycle, we say it once per VM.
        self._refused.add(key)
        logger.error(
            "Could not add channel '%d %s' - too many VMs (%s)", vm.id, vm.name, self._counts()
        )

    def _remove(self, ch: _Channel, reason: str) -> None:
        if ch.sock is not None:
            self._disconnect(ch, reason)
        self._channels.pop(ch.vm.id, None)
        logger.info("Removed channel '%s' (%s): %s", ch.label, self._counts(), reason)

    def _expire(self, now: float) -> None:
        for ch in list(self._channels.values()):
            # Upstream vio_expire: no metrics for expiration_time -> closed;
            # until then the guest keeps getting the last block (FACTS.md section 4).
            if now - ch.updated > self._expiration:
                logger.debug("Expire channel '%s'", ch.label)
                self._remove(ch, f"no metrics for {self._expiration:g} s")

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
        for ch in list(self._channels.values()):
            if ch.sock is None and ch.retry_path is not None and ch.retry_at <= now:
                self._try_connect(ch, ch.retry_path, now)

    def _discover(self) -> None:
        """A full pass: find and try the socket of every channel not connected."""
        if self._loop is None:
            return
        now = self._clock()
        self._discovery.begin_pass(now)
        pending = [ch for ch in self._channels.values() if ch.sock is None]
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

    def _try_connect(self, ch: _Channel, path: bytes, now: float) -> bool:
        try:
            st = os.stat(path)
        except OSError as err:
            if ch.retry_path == path:
                ch.retry_path = None  # gone: its directory's event or a scan brings it back
            if err.errno not in _QUIET_CONNECT_ERRNOS:
                where = os.fsdecode(path)
                self._warn_once(ch, err.errno or 0, f"cannot stat {where}: {err.strerror}")
            return False
        if not stat.S_ISSOCK(st.st_mode):
            return False
        ident = (st.st_dev, st.st_ino)
        if ident == ch.failed_ident and now < ch.retry_at:
            return False
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as err:  # EMFILE/ENFILE: try again on a later tick
            self._warn_once(ch, err.errno or 0, f"cannot create a socket: {err.strerror}")
            self._note_failure(ch, ident, now)
            return False
        try:
            sock.setblocking(False)
            # A non-blocking connect on AF_UNIX completes at once or fails
            # (EAGAIN when QEMU's backlog is full): nothing to wait for.
            sock.connect(path)
        except OSError as err:
            sock.close()
            if err.errno in _QUIET_CONNECT_ERRNOS:
                logger.debug(
                    "connect to %s for '%s' failed: %s", os.fsdecode(path), ch.label, err.strerror
                )
            else:
                self._warn_once(
                    ch, err.errno or 0, f"cannot connect to {os.fsdecode(path)}: {err.strerror}"
                )
            self._note_failure(ch, ident, now)
            ch.retry_path = path
            return False
        assert self._loop is not None
        ch.sock = sock
        ch.connected_at = now
        ch.failed_ident = ident  # remembered for a too-short connection
        ch.retry_path = path  # reconnect here when QEMU drops us
        ch.exchange.reset()
        ch.warned.clear()
        self._connections += 1
        self._loop.add_reader(sock.fileno(), self._on_readable, ch)
        logger.info("Opened channel '%s' (%s)", ch.label, self._counts())
        return True

    def _note_failure(self, ch: _Channel, ident: Tuple[int, int], now: float) -> None:
        if ident != ch.failed_ident:
            ch.backoff = 0.0
        ch.failed_ident = ident
        ch.backoff = min(max(ch.backoff * 2, self._poll), MAX_RETRY_DELAY)
        ch.retry_at = now + ch.backoff

    def _warn_once(self, ch: _Channel, code: int, message: str) -> None:
        if code in ch.warned:
            return
        ch.warned.add(code)
        logger.warning("channel '%s': %s", ch.label, message)

    def _disconnect(self, ch: _Channel, reason: str) -> None:
        sock, ch.sock = ch.sock, None
        if sock is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
            self._loop.remove_writer(sock.fileno())
        sock.close()
        self._connections -= 1
        ch.exchange.reset()
        ch.paused = False
        now = self._clock()
        if now - ch.connected_at < MIN_HEALTHY_LIFETIME and ch.failed_ident is not None:
            self._note_failure(ch, ch.failed_ident, now)
        else:
            ch.failed_ident = None
            ch.backoff = 0.0
            ch.retry_at = 0.0
        logger.info("Closed channel '%s' (%s): %s", ch.label, self._counts(), reason)

    # --- I/O callbacks ----------------------------------------------------------------

    def _over_budget(self) -> bool:
        now = time.perf_counter()
        if now - self._io_window_start >= IO_WINDOW:
            self._io_window_start = now
            self._io_busy = 0.0
        return self._io_busy >= IO_WINDOW * IO_SHARE

    def _pause(self, ch: _Channel) -> None:
        """Stop reading CH until the next window; it keeps its place in the queue."""
        assert ch.sock is not None and self._loop is not None
        self._loop.remove_reader(ch.sock.fileno())
        ch.paused = True
        self._paused.append(ch)
        self._schedule_resume()

    def _schedule_resume(self) -> None:
        if self._resume_handle is None and self._loop is not None:
            delay = max(0.0, self._io_window_start + IO_WINDOW - time.perf_counter())
            self._resume_handle = self._loop.call_later(delay, self._resume)

    def _resume(self) -> None:
        """Serve paused channels first come, first served, within the budget."""
        self._resume_handle = None
        while self._paused:
            if self._over_budget():
                self._schedule_resume()
                return
            ch = self._paused.popleft()
            if not ch.paused or ch.sock is None:
                continue
            ch.paused = False
            assert self._loop is not None
            self._loop.add_reader(ch.sock.fileno(), self._on_readable, ch)
            start = time.perf_counter()
            self._read(ch)
            self._io_busy += time.perf_counter() - start

    def _on_readable(self, ch: _Channel) -> None:
        if ch.sock is None:
            return
        # Channels already waiting go first; over budget, this one waits too.
        if self._paused or self._over_budget():
            self._pause(ch)
            return
        start = time.perf_counter()
        self._read(ch)
        self._io_busy += time.perf_counter() - start

    def _read(self, ch: _Channel) -> None:
        sock = ch.sock
        if sock is None:
            return
        try:
            data = sock.recv(ch.exchange.recv_size())
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._disconnect(ch, f"receive failed: {err.strerror}")
            return
        if not data:
            self._disconnect(ch, "closed by QEMU")
            return
        verdict = ch.exchange.feed(data)
        if verdict is Request.INCOMPLETE:
            return
        if verdict is Request.INVALID:
            logger.debug("invalid request on channel '%s'", ch.label)
            if ch.exchange.overlong:
                self._discard_overlong_rest(ch, sock)
                if ch.sock is None:
                    return
        if ch.blocked:
            verdict = Request.INVALID  # the policy blocks this VM: the protocol's error only
        host = self._host if ch.host is None else ch.host
        self._send(ch, reply_to(verdict, host, ch.block))

    def _discard_overlong_rest(self, ch: _Channel, sock: socket.socket) -> None:
        """Drop the bytes already waiting on CH: the rest of an overlong request.

        DEVIATION (upstream goes silent after 511 bytes
        without a terminator). The rule: when a request fills the 511-byte
        buffer without a blank-line terminator, it is answered INVALID
        REQUEST and every byte already queued on the socket at that moment
        (SIOCINQ) is discarded with it, terminator or not: the guest sent
        them with the overlong request, before our answer. The first byte
        that arrives afterwards starts a new request. So a guest writing 689
        bytes then, later, GET /metrics/XML gets INVALID REQUEST then the
        metrics; a well-formed request sent in the same burst as an overlong
        one is lost with it. At most what was queued is read: a guest that
        keeps sending cannot keep us here.
        """
        try:
            queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
            while queued > 0:
                chunk = sock.recv(min(queued, 65536))
                if not chunk:
                    break
                queued -= len(chunk)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._disconnect(ch, f"receive failed: {err.strerror}")

    def _send(self, ch: _Channel, parts: Sequence[bytes]) -> None:
        sock = ch.sock
        assert sock is not None and self._loop is not None
        bufs = [memoryview(p) for p in parts if p]
        try:
            sent = sock.sendmsg(bufs, (), socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as err:
            self._disconnect(ch, f"send failed: {err.strerror}")
            return
        if not ch.exchange.sent(bufs, sent):
            return
        # The guest is not reading fast enough: stop reading its requests
        # until this reply is out (one reply in flight, bounded memory).
        fd = sock.fileno()
        self._loop.remove_reader(fd)
        self._loop.add_writer(fd, self._on_writable, ch)

    def _on_writable(self, ch: _Channel) -> None:
        sock = ch.sock
        out = ch.exchange.out
        if sock is None or not out:
            return
        start = time.perf_counter()
        try:
            sent = sock.sendmsg(out, (), socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._disconnect(ch, f"send failed: {err.strerror}")
            return
        finally:
            self._io_busy += time.perf_counter() - start
        if ch.exchange.sent(out, sent):
            return
        assert self._loop is not None
        fd = sock.fileno()
        self._loop.remove_writer(fd)
        self._loop.add_reader(fd, self._on_readable, ch)


def _apply_view(ch: _Channel, snapshot: Snapshot, vm: VM) -> None:
    """What CH's VM may see of SNAPSHOT, by its policy (SNAPSHOT.view)."""
    assert snapshot.view is not None
    seen = snapshot.view.for_vm(snapshot, vm)
    ch.blocked = seen is None
    if seen is not None:
        ch.host = seen.host
        ch.block = b"".join(b.xml for b in seen.vms)
