"""The virtio-serial client: ask the host for this VM's metrics over the port.

Protocol (FACTS.md section 4): write ``GET /metrics/XML\\n\\n``, the host answers
``<metrics>\\n ... </metrics>\\n\\n`` or ``INVALID REQUEST\\n\\n``. On a real
port, writes block until the host side is connected and reads return EOF
while it is not (GUEST-E2E.md), so everything is non-blocking and polled
against one overall deadline. Only one process can hold the port: a second
open gets EBUSY, reported as such.
"""

import errno
import logging
import math
import os
import select
import time
from typing import Callable

from vhostmd_wire.protocol import CHANNEL_NAME, DOC_HEAD, REPLY_TAIL, REPLY_TERMINATOR, REQUEST

from .errors import (
    InvalidReplyError,
    ReplyTooLargeError,
    StrPath,
    VirtioBusyError,
    VirtioError,
    VirtioOpenError,
    VirtioTimeoutError,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = "/dev/virtio-ports/" + CHANNEL_NAME
DEFAULT_TIMEOUT = 5.0
MAX_REPLY = 16 * 1024 * 1024
_CHUNK = 65536
# How long to wait before polling again while the port reports EOF/hang-up
# (host side not connected): poll() returns at once then, and spinning on it
# would burn a CPU. Upstream sleeps 10 ms between attempts too.
_IDLE = 0.01


def _open_port(port: str) -> int:
    # O_NOCTTY: a pty stand-in (tests) or a console-like port must never
    # become our controlling terminal.
    flags = os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        return os.open(port, flags)
    except OSError as err:
        if err.errno == errno.EBUSY:
            raise VirtioBusyError(port, err.strerror or "busy", err.errno) from err
        raise VirtioOpenError(port, err.strerror or str(err), err.errno) from err


def _reply_complete(buf: bytearray) -> bool:
    if not buf.endswith(REPLY_TERMINATOR):
        return False
    # A metrics reply may contain blank lines inside values, so only its
    # closing tag ends it (upstream stops at any read ending in "\n\n").
    return buf.endswith(REPLY_TAIL) or not buf.startswith(DOC_HEAD.rstrip())


def read_virtio_metrics(
    port: StrPath = DEFAULT_PORT,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_reply: int = MAX_REPLY,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bytes:
    """Send the request on ``port`` and return the whole reply bytes (``...</metrics>\\n\\n``)."""
    path = os.fspath(port)
    if not (math.isfinite(timeout) and timeout >= 0):
        raise ValueError(f"timeout must be a finite number of seconds >= 0, not {timeout!r}")
    deadline = clock() + timeout
    fd = _open_port(path)
    try:
        _drain(fd)
        _send(fd, path, deadline, timeout, clock, sleep)
        reply = _receive(fd, path, deadline, timeout, max_reply, clock, sleep)
    finally:
        os.close(fd)
    if not reply.startswith(DOC_HEAD.rstrip()):
        first = bytes(reply[:60]).split(b"\n", 1)[0].decode("ascii", "replace")
        raise InvalidReplyError(path, f"host replied {first!r} instead of a metrics document")
    log.debug("virtio port %s: %d-byte reply", path, len(reply))
    return reply


def _remaining_ms(deadline: float, clock: Callable[[], float]) -> int:
    return max(0, int((deadline - clock()) * 1000))


def _drain(fd: int) -> None:
    # A reply to an earlier client that gave up may still sit in the port;
    # it must not be taken for the start of ours.
    for _ in range(256):
        try:
            if not os.read(fd, _CHUNK):
                return
        except BlockingIOError:
            return
        except OSError:
            return


def _send(
    fd: int,
    path: str,
    deadline: float,
    timeout: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    sent = 0
    while sent < len(REQUEST):
        if clock() >= deadline:
            raise VirtioTimeoutError(path, timeout, 0)
        events = poller.poll(_remaining_ms(deadline, clock))
        if not events:
            continue
        revents = events[0][1]
        if not revents & select.POLLOUT:
            # POLLHUP/POLLERR: host not connected yet; wait, do not spin.
            sleep(min(_IDLE, max(0.0, deadline - clock())))
            continue
        try:
            sent += os.write(fd, REQUEST[sent:])
        except (BlockingIOError, InterruptedError):
            continue
        except OSError as err:
            raise VirtioError(path, f"write: {err.strerror}", err.errno) from err


def _receive(
    fd: int,
    path: str,
    deadline: float,
    timeout: float,
    max_reply: int,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> bytes:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    buf = bytearray()
    while True:
        if clock() >= deadline:
            raise VirtioTimeoutError(path, timeout, len(buf))
        events = poller.poll(_remaining_ms(deadline, clock))
        if not events:
            continue
        revents = events[0][1]
        chunk = b""
        if revents & select.POLLIN:
            try:
                # Never read more than one byte past the limit: memory stays
                # bounded whatever the host sends.
                chunk = os.read(fd, min(_CHUNK, max_reply + 1 - len(buf)))
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as err:
                if err.errno != errno.EIO:
                    raise VirtioError(path, f"read: {err.strerror}", err.errno) from err
                # EIO: the other end is gone (a pty whose master closed);
                # treat it like a disconnected host: wait for the deadline.
        if not chunk:
            # EOF / hang-up: the host side is not connected (GUEST-E2E.md).
            sleep(min(_IDLE, max(0.0, deadline - clock())))
            continue
        buf += chunk
        if len(buf) > max_reply:
            raise ReplyTooLargeError(path, max_reply)
        if _reply_complete(buf):
            return bytes(buf)
