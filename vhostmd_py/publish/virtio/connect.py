"""Connecting a virtio channel to QEMU's socket, with back-off for sockets that refuse us.

The daemon is the client of QEMU's per-VM listening socket. Where the
sockets are is vhostmd_py.publish.virtio.discovery's; this module makes one
attempt on one path and keeps the channel's retry state; the server decides
when to try and watches the socket once it is connected.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from typing import Tuple

from vhostmd_py.publish.virtio.channels import Channel

logger = logging.getLogger(__name__)

# A socket that refuses us is retried with a growing delay (same inode), so
# 1000 stale sockets do not cost 20000 connect() calls a second; a recreated
# socket (new inode) is tried at once.
MAX_RETRY_DELAY = 1.0
# A connection that QEMU drops sooner than this counts as a failure for the
# retry delay, so a peer that accepts and closes at once is not hammered.
MIN_HEALTHY_LIFETIME = 1.0

# Errors expected while a VM starts, stops or restarts: logged at DEBUG only.
_QUIET_CONNECT_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN, errno.ECONNRESET, errno.ENOTDIR}
)


class Connector:
    """One connect attempt at a time; the first retry delay is POLL seconds."""

    def __init__(self, poll: float) -> None:
        self._poll = poll

    def connect(self, ch: Channel, path: bytes, now: float) -> bool:
        """Try PATH for CH; True with ``ch.sock`` set (non-blocking) when connected."""
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
        ch.sock = sock
        ch.connected_at = now
        ch.failed_ident = ident  # remembered for a too-short connection
        ch.retry_path = path  # reconnect here when QEMU drops us
        ch.exchange.reset()
        ch.warned.clear()
        return True

    def disconnected(self, ch: Channel, now: float) -> None:
        """CH's connection ended at NOW: a short-lived one counts as a failure."""
        ch.exchange.reset()
        ch.paused = False
        if now - ch.connected_at < MIN_HEALTHY_LIFETIME and ch.failed_ident is not None:
            self._note_failure(ch, ch.failed_ident, now)
        else:
            ch.failed_ident = None
            ch.backoff = 0.0
            ch.retry_at = 0.0

    def _note_failure(self, ch: Channel, ident: Tuple[int, int], now: float) -> None:
        if ident != ch.failed_ident:
            ch.backoff = 0.0
        ch.failed_ident = ident
        ch.backoff = min(max(ch.backoff * 2, self._poll), MAX_RETRY_DELAY)
        ch.retry_at = now + ch.backoff

    @staticmethod
    def _warn_once(ch: Channel, code: int, message: str) -> None:
        """Log MESSAGE for CH unless error CODE was already said since it last connected."""
        if code in ch.warned:
            return
        ch.warned.add(code)
        logger.warning("channel '%s': %s", ch.label, message)
