"""The endpoint's bounded HTTP server: limits, deadline, connection slots, fault lines."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from email.message import Message
from typing import Iterator, List

import pytest

from vhostmd_py.publish.bounded_http import Answer, BoundedHTTPServer, ClientFaults, Limits


def _app(headers: Message) -> Answer:
    return 200, [("Content-Type", "text/plain")], f"accept={headers.get('Accept')}\n".encode()


@pytest.fixture
def serve() -> Iterator:
    servers: List[BoundedHTTPServer] = []

    def start(limits: Limits) -> int:
        server = BoundedHTTPServer(("127.0.0.1", 0), _app, limits=limits)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return int(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _exchange(port: int, data: bytes, *, shut: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
            if shut:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_serves_get_and_head(serve) -> None:
    """GET gets the app's body with its headers and Connection: close; HEAD the headers only."""
    port = serve(Limits())
    answer = _exchange(port, b"GET /metrics HTTP/1.1\r\nAccept: text/x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ") and b"Connection: close" in head
    assert b"Content-Length: 14" in head and body == b"accept=text/x\n"
    answer = _exchange(port, b"HEAD / HTTP/1.1\r\n\r\n")
    assert _status(answer) == 200 and answer.endswith(b"\r\n\r\n")


def test_limits_of_line_and_headers(serve) -> None:
    """One byte over each limit is refused, exactly at the limit is served."""
    limits = Limits(request_line=64, header_lines=3, header_bytes=100)
    port = serve(limits)
    line = b"GET /" + b"a" * (64 - len(b"GET / HTTP/1.1\r\n")) + b" HTTP/1.1\r\n"
    assert len(line) == 64 and _status(_exchange(port, line + b"\r\n")) == 200
    longer = line.replace(b"/a", b"/aa")
    assert _status(_exchange(port, longer + b"\r\n")) == 414
    three = b"".join(b"X-%d: 1\r\n" % i for i in range(3))
    assert _status(_exchange(port, b"GET / HTTP/1.1\r\n" + three + b"\r\n")) == 200
    four = three + b"X-3: 1\r\n"
    assert _status(_exchange(port, b"GET / HTTP/1.1\r\n" + four + b"\r\n")) == 431
    fat = b"X: " + b"b" * 95 + b"\r\n"  # 100 bytes, then the blank line's 2 are over
    assert _status(_exchange(port, b"GET / HTTP/1.1\r\n" + fat + b"\r\n")) == 431
    answer = _exchange(port, b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcde")
    assert _status(answer) == 405 and b"Allow: GET, HEAD" in answer


def test_one_deadline_per_connection(serve) -> None:
    """A request trickling one byte every 0.1 s is cut at the deadline (408), not per read."""
    port = serve(Limits(read_deadline=0.5))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nX-Slow: ")
        started = time.monotonic()
        answer = b""
        while not answer:
            time.sleep(0.1)
            with contextlib.suppress(OSError):
                sock.send(b"a")
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                answer = sock.recv(4096)
            sock.setblocking(True)
            assert time.monotonic() - started < 5
    assert _status(answer) == 408
    assert 0.4 <= time.monotonic() - started < 2


def test_connections_beyond_the_slots_get_503(serve) -> None:
    """With 2 slots held by idle clients, a third connection is answered 503 at once."""
    port = serve(Limits(connections=2, read_deadline=3))
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        time.sleep(0.2)  # both accepted and in their threads
        started = time.monotonic()
        assert _status(_exchange(port, b"GET / HTTP/1.1\r\n\r\n")) == 503
        assert time.monotonic() - started < 1
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)  # the slots are given back when their clients leave
    assert _status(_exchange(port, b"GET / HTTP/1.1\r\n\r\n")) == 200


def test_fault_lines_are_rate_limited_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    """One line per kind and interval, the next one with the count since; errors with traceback."""
    now = [0.0]
    faults = ClientFaults(interval=60, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, "vhostmd_py.publish.bounded_http")
    for _ in range(5):
        faults.record("request line too long", "127.0.0.1")
    faults.record("malformed request", "::1")
    now[0] = 61.0
    faults.record("request line too long", "127.0.0.2")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "metrics endpoint: request line too long from 127.0.0.1 (said at most every 60 s)",
        "metrics endpoint: malformed request from ::1 (said at most every 60 s)",
        "metrics endpoint: request line too long from 127.0.0.2, 5 since the last such line"
        " (said at most every 60 s)",
    ]
    assert faults.totals == {"request line too long": 6, "malformed request": 1}
    caplog.clear()
    try:
        raise ValueError("bug")
    except ValueError as err:
        faults.record("internal error", "127.0.0.1", error=err)
    assert caplog.records[0].exc_info is not None


def test_serves_ipv6_loopback() -> None:
    """An IPv6 address gets an AF_INET6 socket (skipped where the host has no ::1)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        server = BoundedHTTPServer(("::1", 0), _app, family=socket.AF_INET6)
    except OSError as err:
        pytest.skip(f"no ::1 here: {err}")
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with socket.create_connection(("::1", server.server_address[1]), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.0 200 ")
    finally:
        server.shutdown()
        server.server_close()
