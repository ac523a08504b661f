"""QEMU's side of a virtio-serial channel and the golden virtio data, for host tests."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import List, Tuple

from vhostmd_wire.protocol import INVALID_REQUEST, REPLY_TAIL

from vhostmd_py.cycle.render import reply_parts
from vhostmd_py.sources.vm import VM

# Generous safety bound for "connects within 0.1 s"; the figures are in bench/.
CONNECT_BOUND = 1.0


def build_reply(host: bytes, vm_xml: bytes) -> bytes:
    """The whole reply the server sends for HOST and VM_XML (render.reply_parts joined)."""
    return b"".join(reply_parts(host, vm_xml))


class FakeQemuChannel:
    """QEMU's end of a virtio-serial channel: a listening UNIX socket; the daemon connects."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: socket.socket | None = None
        self.pending = b""
        self.listener = self._listen()

    def _listen(self) -> socket.socket:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(4)
        return listener

    def accept(self, timeout: float = CONNECT_BOUND) -> float:
        """Wait for the daemon to connect; seconds it took."""
        start = time.monotonic()
        self.listener.settimeout(timeout)
        conn, _ = self.listener.accept()
        conn.settimeout(5.0)
        if self.conn is not None:  # the daemon reconnected: the old connection is over
            self.conn.close()
        self.conn = conn
        return time.monotonic() - start

    def connected_within(self, timeout: float) -> bool:
        """Whether the daemon connects within TIMEOUT."""
        try:
            self.accept(timeout)
        except socket.timeout:
            return False
        return True

    def send(self, *fragments: bytes, gap: float = 0.02) -> None:
        """Write request bytes into the port, in fragments with a pause between."""
        assert self.conn is not None
        for i, fragment in enumerate(fragments):
            if i:
                time.sleep(gap)
            self.conn.sendall(fragment)

    def read_reply(self, timeout: float = 5.0) -> bytes:
        """Read the next whole reply (a metrics document or INVALID REQUEST)."""
        assert self.conn is not None
        self.conn.settimeout(timeout)
        while True:
            reply = self._take_reply()
            if reply is not None:
                return reply
            chunk = self.conn.recv(65536)
            if not chunk:
                raise ConnectionError(f"daemon closed the channel after {len(self.pending)} bytes")
            self.pending += chunk

    def _take_reply(self) -> bytes | None:
        if self.pending.startswith(INVALID_REQUEST):
            size = len(INVALID_REQUEST)
            reply, self.pending = self.pending[:size], self.pending[size:]
            return reply
        end = self.pending.find(REPLY_TAIL)
        if end < 0:
            return None
        end += len(REPLY_TAIL)
        reply, self.pending = self.pending[:end], self.pending[end:]
        return reply

    def drain(self, quiet: float = 0.3) -> List[bytes]:
        """Read replies until none arrives for QUIET seconds."""
        replies = []
        while True:
            try:
                replies.append(self.read_reply(timeout=quiet))
            except socket.timeout:
                assert self.pending == b"", "a partial reply was left"
                return replies

    def request(self, *fragments: bytes) -> bytes:
        """Send a request and return the reply."""
        self.send(*fragments)
        return self.read_reply()

    def silent_for(self, seconds: float) -> bool:
        """True when nothing arrives for SECONDS (the connection still open)."""
        assert self.conn is not None
        self.conn.settimeout(seconds)
        try:
            data = self.conn.recv(65536)
        except socket.timeout:
            return True
        del data  # a byte or the end of the connection: not silent
        return False

    def closed_by_daemon(self, timeout: float) -> bool:
        """True when the daemon closes the connection within TIMEOUT."""
        assert self.conn is not None
        self.conn.settimeout(timeout)
        try:
            while self.conn.recv(65536):
                pass
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True
        return True

    def drop_connection(self) -> None:
        """Close the accepted connection (QEMU disconnecting the backend)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.pending = b""

    def recreate(self) -> None:
        """QEMU restarting: close everything, remove the socket, listen on a new one."""
        self.close()
        self.listener = self._listen()

    def close(self) -> None:
        """Close the connection and the listener and remove the socket file."""
        self.drop_connection()
        self.listener.close()
        if self.path.exists():
            self.path.unlink()


def channel_dir_name(scheme: str, vm: VM) -> str:
    """libvirt's directory name for VM in the old (domain-) or new naming scheme."""
    short = vm.name[:20]
    return f"domain-{vm.id}-{short}" if scheme == "old" else f"{vm.id}-{short}"


def split_golden(content: bytes) -> Tuple[bytes, bytes]:
    """(host part, vm part) of a single-domain upstream document."""
    body = content[len(b"<metrics>\n") : -len(b"</metrics>\n")]
    idx = body.find(b" context='vm'")
    if idx < 0:
        return body, b""
    start = body.rfind(b"  <metric ", 0, idx)
    return body[:start], body[start:]


def disk_content(img: Path) -> bytes:
    """The content bytes of an upstream disk image."""
    raw = img.read_bytes()
    length = int.from_bytes(raw[12:16], "big")
    return raw[16 : 16 + length]


def golden_cases(upstream: Path) -> List[Tuple[str, List[bytes], bytes]]:
    """(name, request fragments, upstream's reply) of every golden single-channel case."""
    summary = json.loads((upstream / "virtio/single/summary.json").read_text())
    return [
        (
            name,
            [f.encode() for f in case["request"]],
            (upstream / f"virtio/single/{name}.bin").read_bytes(),
        )
        for name, case in summary["cases"].items()
    ]
