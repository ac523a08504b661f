"""The OpenMetrics endpoint's HTTP server: the standard library's, with bounds on clients.

``http.server.BaseHTTPRequestHandler`` parses the request and writes the
answer; ``socketserver.ThreadingMixIn`` gives each connection a thread. What
the standard library leaves unbounded is bounded here, because the server
shares the daemon's process (and its GIL) with the metrics loop and a client
is not trusted:

- the request line (``Limits.request_line`` bytes, else 414) and the header
  lines (``Limits.header_lines`` lines and ``Limits.header_bytes`` bytes in
  all, else 431) are read with bounded ``readline`` calls before the
  standard library parses them, so a client never makes the server hold more
  than a few KiB (http.client alone accepts 100 lines of 64 KiB each);
- the whole request head must arrive within ``Limits.read_deadline`` seconds
  of the connection, however slowly it trickles (a deadline per connection,
  not per read; else 408), and the answer must be taken within
  ``Limits.write_timeout`` seconds;
- at most ``Limits.connections`` connections are served at once; one more is
  answered 503 at once by the accepting thread and closed;
- only GET and HEAD are served (405 otherwise); a request body is never read;
  one request per connection (HTTP/1.0 answers, ``Connection: close``);
- a client's fault is one log line per kind at most once per
  ``Limits.log_interval`` seconds, never a traceback (:class:`ClientFaults`).

The application is a callable ``app(headers) -> (status, headers, body)``.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import logging
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from typing import Any, Callable, Dict, List, Tuple

log = logging.getLogger(__name__)

Answer = Tuple[int, List[Tuple[str, str]], bytes]
App = Callable[[Message], Answer]


@dataclass(frozen=True)
class Limits:
    """What one client may make the server hold, and for how long."""

    request_line: int = 8192  # bytes, CRLF included (URLs of a scrape are short)
    header_lines: int = 64
    header_bytes: int = 16384  # all header lines together, CRLFs included
    read_deadline: float = 5.0  # seconds from accept to the end of the request head
    write_timeout: float = 10.0  # seconds for the whole answer to be taken
    connections: int = 16  # served at once; more are answered 503
    linger: float = 2.0  # seconds to drain what a refused client still sends
    log_interval: float = 60.0  # seconds between two log lines of one kind


# Why each refusal happens, as the log says it (one line per kind and interval).
KINDS: Dict[int, str] = {
    HTTPStatus.BAD_REQUEST: "malformed request",
    HTTPStatus.METHOD_NOT_ALLOWED: "method other than GET or HEAD",
    HTTPStatus.REQUEST_TIMEOUT: "request head not received in time",
    HTTPStatus.REQUEST_URI_TOO_LONG: "request line too long",
    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE: "request headers too large or too many",
    HTTPStatus.SERVICE_UNAVAILABLE: "too many connections at once",
    HTTPStatus.HTTP_VERSION_NOT_SUPPORTED: "HTTP version not supported",
}
WRITE_TIMEOUT_KIND = "answer not taken in time"
CONNECTION_KIND = "connection lost"
INTERNAL_KIND = "internal error"

_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 22\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"
    b"too many connections\r\n"
)


class ClientFaults:
    """Rate-limited log lines about misbehaving clients: per kind, one line per interval.

    A line says the kind, the last client's address and how many such faults
    happened since the previous line of that kind. ``totals`` counts them all.
    """

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._said: Dict[str, float] = {}
        self._pending: Dict[str, int] = {}
        self.totals: Dict[str, int] = {}

    def record(self, kind: str, peer: str, *, error: BaseException | None = None) -> None:
        """One fault of KIND from PEER; logged when its kind was not said within the interval."""
        now = self._clock()
        with self._lock:
            self.totals[kind] = self.totals.get(kind, 0) + 1
            self._pending[kind] = self._pending.get(kind, 0) + 1
            said = self._said.get(kind)
            if said is not None and now - said < self._interval:
                return
            self._said[kind] = now
            count = self._pending.pop(kind)
        times = "" if said is None else f", {count} since the last such line"
        if error is not None:  # our bug, not the client's: the traceback helps
            log.error("metrics endpoint: %s serving %s%s", kind, peer, times, exc_info=error)
            return
        log.warning(
            "metrics endpoint: %s from %s%s (said at most every %.0f s)",
            kind, peer, times, self._interval,
        )


class _DeadlineReader(io.RawIOBase):
    """The socket's bytes, each read waiting only until the connection's one deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Writer(io.BufferedIOBase):
    """Unbuffered writes with sendall (the socket's timeout bounds each whole answer)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.sendall(data)
        return len(data)


class _Refused(Exception):
    """The request was answered with an error; nothing more to do."""


class _Handler(http.server.BaseHTTPRequestHandler):
    """One connection, one request, every read and write bounded."""

    server: BoundedHTTPServer
    protocol_version = "HTTP/1.0"
    server_version = "vhostmd"

    def setup(self) -> None:
        limits = self.server.limits
        self.connection = self.request
        self.rfile = io.BufferedReader(  # type: ignore[assignment]
            _DeadlineReader(self.connection, time.monotonic() + limits.read_deadline),
            buffer_size=4096,
        )
        self.wfile = _Writer(self.connection)  # type: ignore[assignment]

    def handle(self) -> None:
        self.close_connection = True
        self.raw_requestline = b""
        self.requestline = ""
        self.request_version = "HTTP/1.0"
        self.command = ""
        with contextlib.suppress(_Refused):
            self._serve()

    def _readline(self, limit: int) -> bytes:
        """One line of at most LIMIT bytes, or 408 once the connection's deadline has passed."""
        try:
            return self.rfile.readline(limit)
        except TimeoutError:
            self._refuse(HTTPStatus.REQUEST_TIMEOUT)
            raise  # not reached: _refuse raises _Refused

    def _serve(self) -> None:
        limits = self.server.limits
        line = self._readline(limits.request_line + 1)
        if not line:
            return  # connected and left without a word: nothing to answer or say
        if len(line) > limits.request_line:
            self._refuse(HTTPStatus.REQUEST_URI_TOO_LONG)
        self.raw_requestline = line
        head = b"\r\n"
        if len(line.split()) >= 3:  # HTTP/0.9's two words come without headers
            head = self._read_header_lines()
        socket_reader = self.rfile
        self.rfile = io.BytesIO(head)  # type: ignore[assignment]  # what parse_request reads
        try:
            if not self.parse_request():  # answered (400, 505) through send_error
                return
        finally:
            self.rfile = socket_reader
        if self.command not in ("GET", "HEAD"):
            self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, [("Allow", "GET, HEAD")])
        status, headers, body = self.server.app(self.headers)
        self._answer(status, headers, body)

    def _read_header_lines(self) -> bytes:
        limits = self.server.limits
        lines: List[bytes] = []
        size = 0
        while True:
            line = self._readline(limits.header_bytes - size + 1)
            if not line:
                raise _Refused()  # the client went away mid-request
            size += len(line)
            if size > limits.header_bytes:
                self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            if line in (b"\r\n", b"\n"):
                return b"".join(lines) + b"\r\n"
            lines.append(line)
            if len(lines) > limits.header_lines:
                self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)

    def _answer(self, status: int, headers: List[Tuple[str, str]], body: bytes) -> None:
        self.connection.settimeout(self.server.limits.write_timeout)
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _refuse(self, status: int, headers: List[Tuple[str, str]] | None = None) -> None:
        """Answer STATUS with a one-line body, note the fault, and end the request."""
        self.server.faults.record(KINDS.get(status, f"HTTP {status}"), self.address_string())
        body = f"{int(status)} {HTTPStatus(status).phrase}\r\n".encode("ascii")
        # parse_request takes what it cannot read for HTTP/0.9, which has no status
        # line; a refusal always has one.
        self.request_version = "HTTP/1.0"
        # A client that does not take the answer has nothing more to be told.
        with contextlib.suppress(OSError):
            self._answer(status, [("Content-Type", "text/plain"), *(headers or [])], body)
            self._linger()
        raise _Refused()

    def _linger(self) -> None:
        """Half-close, then read and drop what the client still sends, for a bounded time.

        Closing a socket with unread input resets the connection, and the
        reset can destroy the answer before the client reads it (a client
        still sending 6 MB of headers would never see its 431). The bytes go
        into one small scratch buffer, so lingering costs time, not memory.
        """
        self.connection.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + self.server.limits.linger
        scratch = bytearray(65536)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.connection.settimeout(left)
            if not self.connection.recv_into(scratch):
                return

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """parse_request's refusals (400, 505) go the same way as ours."""
        with contextlib.suppress(_Refused):
            self._refuse(code)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics endpoint: %s " + format, self.address_string(), *args)

    def address_string(self) -> str:
        return str(self.client_address[0])


class BoundedHTTPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Serves APP at ADDRESS (host, port) within LIMITS, one daemon thread per connection."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # a burst of connections waits in the kernel, not in us

    def __init__(
        self,
        address: Tuple[str, int],
        app: App,
        *,
        limits: Limits | None = None,
        family: socket.AddressFamily = socket.AF_INET,
        faults: ClientFaults | None = None,
    ) -> None:
        self.address_family = family
        self.app = app
        self.limits = limits or Limits()
        self.faults = faults or ClientFaults(self.limits.log_interval)
        self._slots = threading.BoundedSemaphore(self.limits.connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread for the connection when a slot is free, else 503 from this thread."""
        if not self._slots.acquire(blocking=False):
            self._turn_away(request, client_address)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _turn_away(self, request: socket.socket, client_address: Any) -> None:
        self.faults.record(KINDS[HTTPStatus.SERVICE_UNAVAILABLE], str(client_address[0]))
        try:
            request.setblocking(False)
            with contextlib.suppress(OSError):  # what was sent already: closing over it resets
                request.recv(65536)
            request.send(_BUSY)  # a few bytes into an empty send buffer: never blocks
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection's failure: one rate-limited line, a traceback only for our own bugs."""
        error = sys.exc_info()[1]
        peer = str(client_address[0]) if client_address else "?"
        if isinstance(error, TimeoutError):
            self.faults.record(WRITE_TIMEOUT_KIND, peer)
        elif isinstance(error, OSError):
            self.faults.record(CONNECTION_KIND, peer)
        else:
            self.faults.record(INTERNAL_KIND, peer, error=error)


__all__ = ("Answer", "App", "BoundedHTTPServer", "ClientFaults", "Limits")
