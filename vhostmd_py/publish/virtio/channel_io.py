"""The virtio channels' I/O: requests read, replies sent, within a share of the loop.

Everything runs on the daemon's asyncio loop with non-blocking sockets and
``loop.add_reader``/``add_writer`` callbacks: no thread and no task per VM.
Per channel at most one request buffer (< 512 bytes) and one reply in
flight, sent with sendmsg() straight from the cycle's shared host bytes and
the VM's own block; while a reply is not drained that guest is not read,
so a guest that floods requests without reading is served at the rate it
reads and its surplus stays in the kernel's (bounded) socket buffer. What
is said is vhostmd_py.publish.virtio.protocol's.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import socket
import struct
import termios
import time
from typing import Callable, Sequence

from vhostmd_py.publish.virtio.channels import Channel
from vhostmd_py.publish.virtio.protocol import Request, reply_to

logger = logging.getLogger(__name__)


class ChannelIO:
    """Reads and replies on connected channels; LOST(channel, reason) closes one.

    Channel I/O may take at most SHARE of each WINDOW seconds of the loop
    (perf_counter: it is CPU cost, not a time the protocol depends on);
    channels over that budget wait their turn in FIFO order.
    """

    def __init__(self, *, lost: Callable[[Channel, str], None], share: float,
                 window: float) -> None:
        self.host = b""  # the cycle's host part of every reply
        self._lost = lost
        self._share = share
        self._window = window
        self._loop: asyncio.AbstractEventLoop | None = None
        self._io_window_start = 0.0
        self._io_busy = 0.0
        self._paused: collections.deque[Channel] = collections.deque()
        self._resume_handle: asyncio.TimerHandle | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve on LOOP from now on."""
        self._loop = loop

    def watch(self, ch: Channel) -> None:
        """CH just connected: read its requests."""
        assert ch.sock is not None and self._loop is not None
        self._loop.add_reader(ch.sock.fileno(), self._on_readable, ch)

    def unwatch(self, sock: socket.socket) -> None:
        """SOCK is about to be closed: no more callbacks for it."""
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
            self._loop.remove_writer(sock.fileno())

    def close(self) -> None:
        """Drop the queue of paused channels (all closed by now)."""
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        self._paused.clear()

    # --- the loop share ----------------------------------------------------------------

    def _over_budget(self) -> bool:
        now = time.perf_counter()
        if now - self._io_window_start >= self._window:
            self._io_window_start = now
            self._io_busy = 0.0
        return self._io_busy >= self._window * self._share

    def _pause(self, ch: Channel) -> None:
        """Stop reading CH until the next window; it keeps its place in the queue."""
        assert ch.sock is not None and self._loop is not None
        self._loop.remove_reader(ch.sock.fileno())
        ch.paused = True
        self._paused.append(ch)
        self._schedule_resume()

    def _schedule_resume(self) -> None:
        if self._resume_handle is None and self._loop is not None:
            delay = max(0.0, self._io_window_start + self._window - time.perf_counter())
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

    # --- I/O callbacks ----------------------------------------------------------------

    def _on_readable(self, ch: Channel) -> None:
        if ch.sock is None:
            return
        # Channels already waiting go first; over budget, this one waits too.
        if self._paused or self._over_budget():
            self._pause(ch)
            return
        start = time.perf_counter()
        self._read(ch)
        self._io_busy += time.perf_counter() - start

    def _read(self, ch: Channel) -> None:
        sock = ch.sock
        if sock is None:
            return
        try:
            data = sock.recv(ch.exchange.recv_size())
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._lost(ch, f"receive failed: {err.strerror}")
            return
        if not data:
            self._lost(ch, "closed by QEMU")
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
        host = self.host if ch.host is None else ch.host
        self._send(ch, reply_to(verdict, host, ch.block))

    def _discard_overlong_rest(self, ch: Channel, sock: socket.socket) -> None:
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
            self._lost(ch, f"receive failed: {err.strerror}")

    def _send(self, ch: Channel, parts: Sequence[bytes]) -> None:
        sock = ch.sock
        assert sock is not None and self._loop is not None
        bufs = [memoryview(p) for p in parts if p]
        try:
            sent = sock.sendmsg(bufs, (), socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as err:
            self._lost(ch, f"send failed: {err.strerror}")
            return
        if not ch.exchange.sent(bufs, sent):
            return
        # The guest is not reading fast enough: stop reading its requests
        # until this reply is out (one reply in flight, bounded memory).
        fd = sock.fileno()
        self._loop.remove_reader(fd)
        self._loop.add_writer(fd, self._on_writable, ch)

    def _on_writable(self, ch: Channel) -> None:
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
            self._lost(ch, f"send failed: {err.strerror}")
            return
        finally:
            self._io_busy += time.perf_counter() - start
        if ch.exchange.sent(out, sent):
            return
        assert self._loop is not None
        fd = sock.fileno()
        self._loop.remove_writer(fd)
        self._loop.add_reader(fd, self._on_readable, ch)
