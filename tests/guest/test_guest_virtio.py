"""Tests of vhostmd_guest.virtio against a pseudo-terminal standing in for the port.

The test plays the host (QEMU + vhostmd) on the pty master; the client
opens the slave by path exactly as it opens /dev/virtio-ports/... in a
guest. Both ends are raw, so bytes pass unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path
from typing import Iterator, List, NamedTuple, Sequence

import pytest
from vhostmd_guest.errors import (
    InvalidReplyError,
    ReplyTooLargeError,
    VirtioOpenError,
    VirtioTimeoutError,
)
from vhostmd_guest.virtio import REQUEST, read_virtio_metrics


class Port(NamedTuple):
    master: int
    slave: int
    path: str


@pytest.fixture
def port() -> Iterator[Port]:
    """A raw pty pair: the master is the host side, the slave path is the 'port'."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    os.set_blocking(master, False)
    try:
        yield Port(master, slave, os.ttyname(slave))
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class Host(threading.Thread):
    """The host side: waits for the request, then answers with chunks and delays."""

    def __init__(
        self,
        master: int,
        chunks: Sequence[bytes],
        *,
        delay: float = 0.0,
        chunk_delay: float = 0.0,
        start_after: float = 0.0,
    ) -> None:
        super().__init__(daemon=True)
        self.master = master
        self.chunks = list(chunks)
        self.delay = delay
        self.chunk_delay = chunk_delay
        self.start_after = start_after
        self.received = bytearray()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._serve()
        except OSError as err:
            if err.errno not in (errno.EIO, errno.EBADF):
                self.error = err

    def _serve(self) -> None:
        if self.stop.wait(self.start_after):
            return
        deadline = time.monotonic() + 10
        while REQUEST not in self.received:
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    self.received += os.read(self.master, 65536)
        if self.stop.wait(self.delay):
            return
        for i, chunk in enumerate(self.chunks):
            if i and self.chunk_delay and self.stop.wait(self.chunk_delay):
                return
            view = memoryview(chunk)
            while view:
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                _, ready, _ = select.select([], [self.master], [], 0.05)
                if ready:
                    with contextlib.suppress(BlockingIOError):
                        view = view[os.write(self.master, view) :]

    def finish(self) -> None:
        self.stop.set()
        self.join(5)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error


def _fragments(data: bytes, size: int) -> List[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_reply_returned_byte_for_byte(port: Port, upstream: Path) -> None:
    """The golden virtio reply comes back exactly; the request is upstream's."""
    reply = (upstream / "virtio" / "single" / "get_xml_lf.bin").read_bytes()
    host = Host(port.master, [reply])
    host.start()
    assert read_virtio_metrics(port.path, timeout=5) == reply
    host.finish()
    assert bytes(host.received) == b"GET /metrics/XML\n\n"


def test_fragmented_delayed_reply_with_blank_lines_inside(port: Port) -> None:
    """Small delayed fragments, with a blank line inside a value, are joined to the end tag."""
    reply = (
        b"<metrics>\n  <metric type='string' context='host'>\n    <name>M</name>\n"
        b"    <value>a\n\n</value>\n  </metric>\n</metrics>\n\n"
    )
    split_at = reply.index(b"\n\n") + 2  # a fragment ending in "\n\n" mid-document
    chunks = _fragments(reply[:split_at], 7) + _fragments(reply[split_at:], 5)
    host = Host(port.master, chunks, delay=0.2, chunk_delay=0.01)
    host.start()
    assert read_virtio_metrics(port.path, timeout=5) == reply
    host.finish()


def test_missing_reply_times_out(port: Port) -> None:
    """A host that never answers gives VirtioTimeoutError within the timeout."""
    host = Host(port.master, [])
    host.start()
    t0 = time.monotonic()
    with pytest.raises(VirtioTimeoutError) as info:
        read_virtio_metrics(port.path, timeout=0.5)
    elapsed = time.monotonic() - t0
    host.finish()
    assert 0.45 <= elapsed < 3.0
    assert info.value.received == 0
    assert info.value.port == port.path


def test_partial_reply_times_out_with_count(port: Port) -> None:
    """A reply cut short reports how much arrived."""
    host = Host(port.master, [b"<metrics>\n  <metric"])
    host.start()
    with pytest.raises(VirtioTimeoutError) as info:
        read_virtio_metrics(port.path, timeout=0.5)
    host.finish()
    assert info.value.received == len(b"<metrics>\n  <metric")


def test_invalid_request_reply_is_an_error(port: Port) -> None:
    """INVALID REQUEST from the host is a typed error naming it."""
    host = Host(port.master, [b"INVALID ", b"REQUEST\n\n"], chunk_delay=0.05)
    host.start()
    with pytest.raises(InvalidReplyError, match="INVALID REQUEST"):
        read_virtio_metrics(port.path, timeout=5)
    host.finish()


def test_oversized_reply_refused(port: Port) -> None:
    """A reply over the limit is refused without waiting for its end."""
    host = Host(port.master, [b"<metrics>\n" + b"x" * (1024 * 1024)])
    host.start()
    t0 = time.monotonic()
    with pytest.raises(ReplyTooLargeError) as info:
        read_virtio_metrics(port.path, timeout=5, max_reply=256 * 1024)
    assert time.monotonic() - t0 < 4
    host.finish()
    assert info.value.limit == 256 * 1024


_CHILD = """
import resource, sys
from vhostmd_guest.virtio import read_virtio_metrics
from vhostmd_guest.errors import ReplyTooLargeError
try:
    read_virtio_metrics(sys.argv[1], timeout=20)
except ReplyTooLargeError as err:
    print("refused", err.limit)
print("maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_default_limit_keeps_memory_bounded(port: Port) -> None:
    """Against 48 MiB of reply the default 16 MiB limit holds and peak memory stays bounded."""
    baseline = subprocess.run(
        [sys.executable, "-c", _CHILD.replace("read_virtio_metrics(sys.argv[1], timeout=20)", "0")],
        capture_output=True,
        text=True,
        check=True,
    )
    base_kib = int(baseline.stdout.split()[-1])
    host = Host(port.master, [b"<metrics>\n"] + [b"y" * (1024 * 1024)] * 48)
    host.start()
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, port.path], capture_output=True, text=True, timeout=60
    )
    host.finish()
    assert child.returncode == 0, child.stderr
    assert f"refused {16 * 1024 * 1024}" in child.stdout
    peak_kib = int(child.stdout.split()[-1])
    # 16 MiB buffered + one 16 MiB copy at most; never the 48 MiB sent.
    assert peak_kib - base_kib < 40 * 1024, (peak_kib, base_kib)


def test_missing_port_is_open_error(tmp_path: Path) -> None:
    """A port that does not exist fails at once with errno ENOENT."""
    with pytest.raises(VirtioOpenError) as info:
        read_virtio_metrics(tmp_path / "org.github.vhostmd.1", timeout=5)
    assert info.value.errno == errno.ENOENT
    assert info.value.strerror == "No such file or directory"


def test_host_gone_waits_without_spinning(port: Port) -> None:
    """When the host side goes away (EIO/hang-up) the client waits for the timeout, idle."""
    # Closing the master removes the /dev/pts node: close it once the client has opened.
    closer = threading.Timer(0.2, os.close, (port.master,))
    closer.start()
    cpu0, t0 = time.process_time(), time.monotonic()
    with pytest.raises(VirtioTimeoutError):
        read_virtio_metrics(port.path, timeout=1.0)
    cpu = time.process_time() - cpu0
    closer.join()
    assert 0.95 <= time.monotonic() - t0 < 3
    assert cpu < 0.5, f"spun for {cpu:.2f} s of CPU"


def test_stale_bytes_are_drained_before_the_request(port: Port) -> None:
    """Leftovers of an earlier client's reply are not taken for ours."""
    os.write(port.master, b"</metric>\n</metrics>\n\n")  # tail of an abandoned reply
    time.sleep(0.05)
    reply = b"<metrics>\n</metrics>\n\n"
    host = Host(port.master, [reply])
    host.start()
    assert read_virtio_metrics(port.path, timeout=5) == reply
    host.finish()


def test_write_waits_until_host_reads(port: Port) -> None:
    """When the port cannot take the request yet, the client polls until it can."""
    os.set_blocking(port.slave, False)
    filled = 0
    try:
        while True:
            filled += os.write(port.slave, b"\0" * 4096)
    except BlockingIOError:
        pass
    assert filled > 0
    reply = b"<metrics>\n</metrics>\n\n"
    host = Host(port.master, [reply], start_after=0.3)
    host.start()
    t0 = time.monotonic()
    assert read_virtio_metrics(port.path, timeout=5) == reply
    assert time.monotonic() - t0 >= 0.25
    host.finish()
