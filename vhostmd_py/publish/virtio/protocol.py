"""The virtio-serial request/reply protocol of one connection (FACTS.md section 4).

What a guest may send and what it gets back, with the per-connection state
that framing needs: the request buffer (< 512 bytes, upstream's) and the
reply still to send. No sockets and no loop here: vhostmd_py.publish.virtio.server
feeds received bytes in and sends what comes out. The bytes themselves are
vhostmd_wire.protocol's (both ends agree on them); the reply document is
rendered by vhostmd_py.cycle.render.
"""

from __future__ import annotations

import enum
from typing import List, Sequence

from vhostmd_wire.protocol import INVALID_REQUEST, REQUEST_MAX, REQUESTS

from vhostmd_py.cycle.render import reply_parts


class Request(enum.Enum):
    """What the bytes received so far on a channel amount to."""

    INCOMPLETE = "incomplete"
    INVALID = "invalid"
    GET_XML = "get_xml"


def classify_request(buf: bytes) -> Request:
    """Upstream's vio_check_request: exact match, else invalid once a blank line or 511 bytes."""
    if buf in REQUESTS:
        return Request.GET_XML
    # Like upstream, the whole buffer is judged at once: two valid requests
    # arriving in one read make ONE invalid request (FACTS.md section 4).
    if b"\n\n" in buf or b"\r\n\r\n" in buf or len(buf) >= REQUEST_MAX:
        return Request.INVALID
    return Request.INCOMPLETE


def reply_to(verdict: Request, host: bytes, block: bytes) -> Sequence[bytes]:
    """The reply to a complete request: the document (HOST part, this VM's BLOCK) or
    upstream's INVALID REQUEST."""
    if verdict is Request.GET_XML:
        return reply_parts(host, block)
    return (INVALID_REQUEST,)


def advance(bufs: List[memoryview], sent: int) -> List[memoryview]:
    """What is left of BUFS after SENT bytes went out."""
    while bufs and sent >= len(bufs[0]):
        sent -= len(bufs[0])
        bufs = bufs[1:]
    if bufs and sent:
        bufs = [bufs[0][sent:], *bufs[1:]]
    return bufs


def is_overlong(buf: bytes) -> bool:
    """Whether BUF, judged INVALID, was so for filling the buffer without a terminator."""
    return len(buf) >= REQUEST_MAX and b"\n\n" not in buf and b"\r\n\r\n" not in buf


class Exchange:
    """One connection's framing state: the request being received, the reply being sent."""

    __slots__ = ("out", "overlong", "rbuf")

    def __init__(self) -> None:
        self.rbuf = bytearray()
        self.out: List[memoryview] = []
        # Set by feed() when the last request filled the buffer without a
        # terminator: the server then discards the rest of it (server.py).
        self.overlong = False

    def reset(self) -> None:
        """A new connection (or none): nothing received, nothing to send."""
        self.rbuf.clear()
        self.out = []
        self.overlong = False

    def recv_size(self) -> int:
        """How many bytes to read at most: never more than the request buffer
        takes, so what is left waits in the kernel, exactly as upstream's
        fixed buffer."""
        return REQUEST_MAX - len(self.rbuf)

    def feed(self, data: bytes) -> Request:
        """Add received DATA; what the buffer now holds (emptied once complete)."""
        self.rbuf += data
        buf = bytes(self.rbuf)
        verdict = classify_request(buf)
        self.overlong = verdict is Request.INVALID and is_overlong(buf)
        if verdict is not Request.INCOMPLETE:
            self.rbuf.clear()
        return verdict

    def sent(self, bufs: List[memoryview], count: int) -> bool:
        """COUNT bytes of BUFS went out; True when some are left (kept in ``out``)."""
        self.out = advance(bufs, count)
        return bool(self.out)
