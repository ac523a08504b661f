"""vhostmd_py.publish.virtio.server: the transport, with the test playing QEMU on real sockets."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterator, List, Sequence, TypeVar

import pytest
from helpers.qemu import (
    CONNECT_BOUND,
    FakeQemuChannel,
    build_reply,
    channel_dir_name,
    disk_content,
    golden_cases,
    split_golden,
)
from vhostmd_wire.protocol import (
    CHANNEL_NAME,
    INVALID_REQUEST,
    REPLY_TAIL,
    REQUEST_CRLF,
    REQUEST_LF,
    REQUEST_MAX,
)

from vhostmd_py.cycle.snapshot import Snapshot, VmBlock
from vhostmd_py.publish.virtio import VirtioServer
from vhostmd_py.publish.virtio.server import raise_fd_limit
from vhostmd_py.sources.vm import VM

T = TypeVar("T")

TEST_VM = VM(1, "test", "6695eb01-f6a4-8304-79aa-97f2502e193f")
REPLY_BOUND = 1.0


# --- helpers: the server on its own loop, snapshots (QEMU's side: helpers.qemu) ------


class ServerThread:
    """A VirtioServer on its own asyncio loop in a thread, so tests can use blocking sockets."""

    def __init__(
        self,
        channel_path: Path,
        *,
        max_channels: int = 1024,
        expiration_time: int = 15,
        clock: Callable[[], float] = time.monotonic,
        use_inotify: bool = True,
    ) -> None:
        self.cfg = _Cfg(str(channel_path), max_channels, expiration_time)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = VirtioServer(self.cfg, clock=clock, use_inotify=use_inotify)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        self.call(self.server.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def update(self, snapshot: Snapshot) -> None:
        """server.update(snapshot) on the loop, as the daemon does after a cycle."""

        async def _update() -> None:
            self.server.update(snapshot)

        self.call(_update())

    def connections(self) -> int:
        """Open channel connections, read on the loop."""
        return self.query(lambda s: s.connections)

    def query(self, fn: Callable[[VirtioServer], T]) -> T:
        """FN(server), evaluated on the server's loop."""

        async def _query() -> T:
            return fn(self.server)

        return self.call(_query())


class _Cfg:
    """Stand-in with VirtioConfig's fields (the server only reads these three)."""

    def __init__(self, channel_path: str, max_channels: int, expiration_time: int) -> None:
        self.channel_path = channel_path
        self.max_channels = max_channels
        self.expiration_time = expiration_time


class ManualClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def metric_xml(vm: VM | None, mtype: str, name: str, value: str) -> bytes:
    """One <metric> element in upstream's layout (FACTS.md section 2)."""
    ctx = "host" if vm is None else f"vm' id='{vm.id}' uuid='{vm.uuid}"
    return (
        f"  <metric type='{mtype}' context='{ctx}'>\n"
        f"    <name>{name}</name>\n"
        f"    <value>{value}</value>\n"
        "  </metric>\n"
    ).encode()


def vm_block(vm: VM, tag: str = "") -> VmBlock:
    """A VM's block naming its own id, name and uuid, so leaks are visible."""
    xml = metric_xml(vm, "string", "Ident", f"{vm.name}-{vm.id}-{vm.uuid}{tag}")
    return VmBlock(vm, xml + metric_xml(vm, "uint32", "VCpus", "1"))


HOST = metric_xml(None, "int32", "Answer", "42") + metric_xml(None, "string", "Greeting", "hello")


def snapshot(vms: Sequence[VM], host: bytes = HOST, tag: str = "") -> Snapshot:
    """A cycle's Snapshot with a block for each VM."""
    return Snapshot(host, tuple(vm_block(vm, tag) for vm in vms))


def expected_reply(vm: VM, host: bytes = HOST, tag: str = "") -> bytes:
    """What VM must receive for snapshot(...) above."""
    return build_reply(host, vm_block(vm, tag).xml)


def vms(n: int) -> List[VM]:
    """node-N style VMs: vm0001..., ids 1..N."""
    return [VM(i, f"vm{i:04d}", f"00000000-0000-4000-8000-{i:012d}") for i in range(1, n + 1)]


def wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    """Poll PRED until true or TIMEOUT."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


@pytest.fixture
def chan_dir() -> Iterator[Path]:
    """A short temporary channel directory (sun_path holds only 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vio", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["old", "new"])
def scheme(request: pytest.FixtureRequest) -> str:
    """libvirt's directory naming: 'domain-<id>-<name>' (old) or '<id>-<name>' (new)."""
    return str(request.param)


@pytest.fixture(params=["inotify", "poll"])
def inotify(request: pytest.FixtureRequest) -> bool:
    """Discovery driven by inotify events, or by polling alone (no inotify)."""
    return bool(request.param == "inotify")


def qemu(chan_dir: Path, scheme: str, vm: VM) -> FakeQemuChannel:
    """A listening channel socket for VM in CHAN_DIR."""
    return FakeQemuChannel(chan_dir / channel_dir_name(scheme, vm) / CHANNEL_NAME)


# --- pure protocol pieces ---------------------------------------------------------------------


def test_raise_fd_limit() -> None:
    """The soft descriptor limit is raised when needed and never lowered."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        want = 1024 + 256
        got = raise_fd_limit(want)
        assert got == (want if hard == resource.RLIM_INFINITY else min(hard, want))
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == got
        assert raise_fd_limit(10) == got
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- the server on real sockets ---------------------------------------------------------------


def test_golden_cases_one_connection(upstream: Path, chan_dir: Path, scheme: str) -> None:
    """The golden request cases on one connection give upstream's bytes (overlong: DEVIATION)."""
    host, vm_part = split_golden(disk_content(upstream / "virtio/single/vbd-disk-same-run.img"))
    good = (upstream / "virtio/single/get_xml_lf.bin").read_bytes()
    fake = qemu(chan_dir, scheme, TEST_VM)
    with ServerThread(chan_dir) as srv:
        srv.update(Snapshot(host, (VmBlock(TEST_VM, vm_part),)))
        fake.accept()
        for name, fragments, golden in golden_cases(upstream):
            if name == "overlong_no_terminator_511":
                # DEVIATION: upstream never answers again and spins a CPU.
                assert golden == b""
                golden = INVALID_REQUEST
            elif name == "get_xml_after_errors":
                assert golden == b""  # upstream's channel was dead by then
                golden = good
            assert fake.request(*fragments) == golden, name
        fake.close()


def test_node10_domain3_golden(upstream: Path, chan_dir: Path, scheme: str) -> None:
    """Domain 3 of node-10 gets the host part and only its own block, as upstream's reply."""
    golden = (upstream / "virtio/node10-domain-3-vm0003/get_xml_lf.bin").read_bytes()
    host, vm3_part = split_golden(golden[: -len(b"\n")])
    ten = vms(10)
    blocks = tuple(VmBlock(vm, vm3_part if vm.id == 3 else vm_block(vm).xml) for vm in ten)
    fake = qemu(chan_dir, scheme, ten[2])
    with ServerThread(chan_dir) as srv:
        srv.update(Snapshot(host, blocks))
        fake.accept()
        assert fake.request(REQUEST_LF) == golden
        assert fake.request(b"GET /foo\n\n") == INVALID_REQUEST
        fake.close()


def test_socket_created_late(chan_dir: Path, scheme: str, inotify: bool) -> None:
    """A socket that appears after the VM got its channel is connected at once, not in 3 s."""
    with ServerThread(chan_dir, use_inotify=inotify) as srv:
        srv.update(snapshot([TEST_VM]))
        time.sleep(0.3)
        fake = qemu(chan_dir, scheme, TEST_VM)
        assert fake.accept() < CONNECT_BOUND
        assert fake.request(REQUEST_LF) == expected_reply(TEST_VM)
        fake.close()


def test_channel_dir_created_late(inotify: bool) -> None:
    """A channel_path that does not exist yet is waited for, then used."""
    chan_dir = Path(tempfile.mkdtemp(prefix="vio", dir="/tmp")) / "later"
    try:
        with ServerThread(chan_dir, use_inotify=inotify) as srv:
            srv.update(snapshot([TEST_VM]))
            time.sleep(0.2)
            fake = qemu(chan_dir, "new", TEST_VM)
            fake.accept()
            assert fake.request(REQUEST_LF) == expected_reply(TEST_VM)
            fake.close()
    finally:
        shutil.rmtree(chan_dir.parent, ignore_errors=True)


def test_reconnect_after_socket_recreated(chan_dir: Path, scheme: str, inotify: bool) -> None:
    """QEMU closing and recreating the socket (VM restart of the chardev) is reconnected."""
    fake = qemu(chan_dir, scheme, TEST_VM)
    with ServerThread(chan_dir, use_inotify=inotify) as srv:
        srv.update(snapshot([TEST_VM]))
        fake.accept()
        assert fake.request(REQUEST_LF) == expected_reply(TEST_VM)
        fake.recreate()
        assert fake.accept() < CONNECT_BOUND
        assert fake.request(REQUEST_CRLF) == expected_reply(TEST_VM)
        fake.close()


def test_reconnect_same_socket(chan_dir: Path, inotify: bool) -> None:
    """QEMU dropping the connection but still listening is reconnected too."""
    fake = qemu(chan_dir, "new", TEST_VM)
    with ServerThread(chan_dir, use_inotify=inotify) as srv:
        srv.update(snapshot([TEST_VM]))
        fake.accept()
        assert fake.request(REQUEST_LF) == expected_reply(TEST_VM)
        fake.drop_connection()
        fake.accept(timeout=3.0)
        assert fake.request(REQUEST_LF) == expected_reply(TEST_VM)
        fake.close()


def test_replies_follow_updates(chan_dir: Path) -> None:
    """Each reply carries the latest cycle's host and VM metrics."""
    fake = qemu(chan_dir, "old", TEST_VM)
    with ServerThread(chan_dir) as srv:
        srv.update(snapshot([TEST_VM]))
        fake.accept()
        assert fake.request(REQUEST_LF) == expected_reply(TEST_VM)
        host2 = metric_xml(None, "int32", "Answer", "43")
        srv.update(snapshot([TEST_VM], host=host2, tag="-cycle2"))
        assert fake.request(REQUEST_LF) == expected_reply(TEST_VM, host=host2, tag="-cycle2")
        srv.update(snapshot([TEST_VM], host=b"", tag="-cycle3"))
        reply = fake.request(REQUEST_LF)
        assert reply == expected_reply(TEST_VM, host=b"", tag="-cycle3")
        assert reply.startswith(b"<metrics>\n<!-- host metrics not available -->  <metric ")
        fake.close()


def test_wrong_name_and_unknown_id_not_connected(chan_dir: Path) -> None:
    """'domain-3-wrongname' (DEVIATION: upstream connects it) and 'domain-99-nosuch' stay alone."""
    ten = vms(10)
    wrong = FakeQemuChannel(chan_dir / "domain-3-wrongname" / CHANNEL_NAME)
    nosuch = FakeQemuChannel(chan_dir / "domain-99-nosuch" / CHANNEL_NAME)
    right = qemu(chan_dir, "old", ten[4])
    with ServerThread(chan_dir) as srv:
        srv.update(snapshot(ten))
        right.accept()
        assert not wrong.connected_within(0.5)
        assert not nosuch.connected_within(0.1)
        assert right.request(REQUEST_LF) == expected_reply(ten[4])
    for fake in (wrong, nosuch, right):
        fake.close()


def test_recycled_id_gets_no_metrics_of_old_vm(chan_dir: Path) -> None:
    """A new VM reusing an id is a new channel; the old VM's connection is closed at once."""
    old = VM(5, "alpha", "00000000-0000-4000-8000-0000000000aa")
    new = VM(5, "beta", "00000000-0000-4000-8000-0000000000bb")
    fake_old = qemu(chan_dir, "new", old)
    fake_new = qemu(chan_dir, "new", new)
    with ServerThread(chan_dir) as srv:
        srv.update(snapshot([old]))
        fake_old.accept()
        assert fake_old.request(REQUEST_LF) == expected_reply(old)
        srv.update(snapshot([new]))
        assert fake_old.closed_by_daemon(CONNECT_BOUND)
        fake_new.accept()
        assert fake_new.request(REQUEST_LF) == expected_reply(new)
        assert not fake_old.connected_within(0.3)
    fake_old.close()
    fake_new.close()


def test_channel_path_from_live_xml_wins(chan_dir: Path, inotify: bool) -> None:
    """A VM whose live XML names its socket is connected there, not to a discovered one."""
    xml_sock = chan_dir / "custom" / "vm.sock"
    vm = VM(2, "vm0002", "00000000-0000-4000-8000-000000000002", channel_path=str(xml_sock))
    from_xml = FakeQemuChannel(xml_sock)
    discovered = qemu(chan_dir, "old", vm)
    with ServerThread(chan_dir, use_inotify=inotify) as srv:
        srv.update(snapshot([vm]))
        from_xml.accept()
        assert from_xml.request(REQUEST_LF) == expected_reply(vm)
        assert not discovered.connected_within(0.3)
        assert srv.query(lambda s: s.connected_path(vm.id)) == str(xml_sock)
    from_xml.close()
    discovered.close()


def test_vm_gone_closes_at_once(chan_dir: Path) -> None:
    """A VM no longer running loses its connection in the same update."""
    two = vms(2)
    fakes = [qemu(chan_dir, "old", vm) for vm in two]
    with ServerThread(chan_dir) as srv:
        srv.update(snapshot(two))
        for fake in fakes:
            fake.accept()
        srv.update(snapshot(two[1:]))
        assert fakes[0].closed_by_daemon(CONNECT_BOUND)
        assert not fakes[0].connected_within(0.3)
        assert fakes[1].request(REQUEST_LF) == expected_reply(two[1])
        assert srv.connections() == 1
    for fake in fakes:
        fake.close()


def test_max_channels(chan_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Beyond max_channels VMs get no channel, logged once each (upstream: every cycle)."""
    caplog.set_level(logging.INFO, logger="vhostmd_py.publish.virtio")
    five = vms(5)
    fakes = [qemu(chan_dir, "new", vm) for vm in five]
    with ServerThread(chan_dir, max_channels=3) as srv:
        for _ in range(3):
            srv.update(snapshot(five))
        for fake in fakes[:3]:
            fake.accept()
        for fake in fakes[3:]:
            assert not fake.connected_within(0.3)
        assert srv.query(lambda s: s.channel_ids()) == [1, 2, 3]
        refused = [r.getMessage() for r in caplog.records if "too many VMs" in r.getMessage()]
        assert sorted(refused) == [
            # Counts as upstream's "(0/8/8)": the update adds before it connects.
            "Could not add channel '4 vm0004' - too many VMs (0/3/3)",
            "Could not add channel '5 vm0005' - too many VMs (0/3/3)",
        ]
        # A slot that frees up goes to a waiting VM at the next update.
        srv.update(snapshot(five[1:]))
        assert fakes[0].closed_by_daemon(CONNECT_BOUND)
        fakes[3].accept()
        assert fakes[3].request(REQUEST_LF) == expected_reply(five[3])
        assert not fakes[4].connected_within(0.2)
    for fake in fakes:
        fake.close()


def test_expiry_keeps_last_block_then_closes(chan_dir: Path) -> None:
    """A VM whose metrics stop keeps its last block until expiration_time, then is closed."""
    clock = ManualClock()
    fake = qemu(chan_dir, "old", TEST_VM)
    with ServerThread(chan_dir, expiration_time=15, clock=clock) as srv:
        srv.update(snapshot([TEST_VM]))
        fake.accept()
        before = fake.request(REQUEST_LF)
        assert before == expected_reply(TEST_VM)
        for _ in range(14):  # the VM's metric fails: empty block every cycle
            clock.now += 1.0
            srv.update(Snapshot(HOST, (VmBlock(TEST_VM, b""),)))
            assert fake.request(REQUEST_LF) == before
        clock.now += 1.5
        assert fake.closed_by_daemon(CONNECT_BOUND)
        # No metrics for it: not reconnected while the socket still listens.
        srv.update(Snapshot(HOST, (VmBlock(TEST_VM, b""),)))
        assert not fake.connected_within(0.3)
        # Metrics back: a new channel, connected again.
        srv.update(snapshot([TEST_VM], tag="-back"))
        fake.accept()
        assert fake.request(REQUEST_LF) == expected_reply(TEST_VM, tag="-back")
        fake.close()


def test_vm_without_metrics_gets_no_channel(chan_dir: Path) -> None:
    """As upstream, a VM gets a channel once it has vm metrics, not before."""
    fake = qemu(chan_dir, "new", TEST_VM)
    with ServerThread(chan_dir) as srv:
        srv.update(Snapshot(HOST, (VmBlock(TEST_VM, b""),)))
        assert not fake.connected_within(0.3)
        srv.update(snapshot([TEST_VM]))
        fake.accept()
        assert fake.request(REQUEST_LF) == expected_reply(TEST_VM)
    fake.close()


def test_isolation_across_10_vms(chan_dir: Path, scheme: str) -> None:
    """Each of 10 VMs receives the host metrics and only its own block."""
    ten = vms(10)
    fakes = [qemu(chan_dir, scheme, vm) for vm in ten]
    with ServerThread(chan_dir) as srv:
        srv.update(snapshot(ten))
        for fake in fakes:
            fake.accept()
        for _ in range(3):
            for vm, fake in zip(ten, fakes):
                reply = fake.request(REQUEST_LF)
                assert reply == expected_reply(vm)
                for other in ten:
                    if other.id != vm.id:
                        assert other.uuid.encode() not in reply
                        assert f"id='{other.id}'".encode() not in reply
    for fake in fakes:
        fake.close()


def _flood_until_blocked(sock: socket.socket, payload: bytes, limit: int = 64 << 20) -> int:
    """Write PAYLOAD without reading until the socket would block; bytes written."""
    sock.setblocking(False)
    total = 0
    try:
        while total < limit:
            total += sock.send(payload)
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)
    return total


def test_hostile_guests_do_not_delay_a_good_one(chan_dir: Path) -> None:
    """Non-reading flooders, garbage and overlong senders never slow a good guest's replies."""
    five = vms(5)
    good_vm, flood_vm, garbage_vm, overlong_vm, fast_vm = five
    big_host = HOST * 200  # ~20 KiB replies fill socket buffers quickly
    fakes = {vm.id: qemu(chan_dir, "old", vm) for vm in five}
    with ServerThread(chan_dir) as srv:
        srv.update(snapshot(five, host=big_host))
        for fake in fakes.values():
            fake.accept()
        good = fakes[good_vm.id]
        flood = fakes[flood_vm.id]
        assert flood.conn is not None
        # The flooder never reads: the daemon stops reading it once a reply is stuck,
        # so what it can write is bounded by the kernel's socket buffers.
        written = _flood_until_blocked(flood.conn, REQUEST_LF * 100)
        assert written < 16 << 20
        stop = threading.Event()

        def garbage() -> None:
            conn = fakes[garbage_vm.id].conn
            assert conn is not None
            while not stop.is_set():
                conn.sendall(os.urandom(300) + b"\n\n")
                assert conn.recv(65536)

        def overlong() -> None:
            fake = fakes[overlong_vm.id]
            assert fake.conn is not None
            while not stop.is_set():
                # One full buffer, one answer: the daemon discards whatever
                # else was queued with an overlong request.
                fake.conn.sendall(b"A" * REQUEST_MAX)
                assert fake.read_reply() == INVALID_REQUEST

        def fast() -> None:
            fake = fakes[fast_vm.id]
            while not stop.is_set():
                assert fake.request(REQUEST_LF) == expected_reply(fast_vm, host=big_host)

        threads = [threading.Thread(target=f, daemon=True) for f in (garbage, overlong, fast)]
        for t in threads:
            t.start()
        try:
            worst = 0.0
            want = expected_reply(good_vm, host=big_host)
            for i in range(30):
                if i == 15:  # a new cycle while under attack
                    srv.update(snapshot(five, host=big_host))
                start = time.monotonic()
                assert good.request(REQUEST_LF) == want
                worst = max(worst, time.monotonic() - start)
            assert worst < REPLY_BOUND
        finally:
            stop.set()
            for t in threads:
                t.join(5)
        # Once the flooder reads, it gets well-formed replies to what it sent (requests
        # coalesced in one read are one invalid request, as upstream), then normal service.
        backlog = flood.drain()
        assert backlog
        flood_reply = expected_reply(flood_vm, host=big_host)
        assert set(backlog) <= {INVALID_REQUEST, flood_reply}
        assert flood.request(REQUEST_LF) == flood_reply
        # The overlong sender is still answered.
        assert fakes[overlong_vm.id].request(REQUEST_LF) == expected_reply(
            overlong_vm, host=big_host
        )
    for fake in fakes.values():
        fake.close()


def test_overlong_then_valid(chan_dir: Path) -> None:
    """511 bytes without terminator -> INVALID REQUEST, and the channel keeps answering."""
    fake = qemu(chan_dir, "new", TEST_VM)
    with ServerThread(chan_dir) as srv:
        srv.update(snapshot([TEST_VM]))
        fake.accept()
        assert fake.request(b"A" * 511) == INVALID_REQUEST
        assert fake.request(b"A" * 300, b"B" * 211) == INVALID_REQUEST
        assert fake.silent_for(0.2)  # one reply per request, nothing more
        # 1022 bytes in one write: ONE overlong request; its queued rest is
        # discarded with it, so the next request is answered.
        fake.send(b"C" * 1022)
        assert fake.read_reply() == INVALID_REQUEST
        assert fake.silent_for(0.2)
        assert fake.request(REQUEST_LF) == expected_reply(TEST_VM)
        fake.close()


def test_close_closes_connections(chan_dir: Path) -> None:
    """server.close() closes every channel connection."""
    fake = qemu(chan_dir, "new", TEST_VM)
    srv = ServerThread(chan_dir).__enter__()
    try:
        srv.update(snapshot([TEST_VM]))
        fake.accept()
        srv.call(srv.server.close())
        assert fake.closed_by_daemon(CONNECT_BOUND)
        srv.update(snapshot([TEST_VM]))  # after close: ignored
        assert not fake.connected_within(0.2)
    finally:
        srv.__exit__(None, None, None)
        fake.close()


def test_not_a_socket_is_ignored(chan_dir: Path) -> None:
    """A regular file where the socket should be is skipped without error."""
    path = chan_dir / "1-test" / CHANNEL_NAME
    path.parent.mkdir()
    path.write_bytes(b"not a socket")
    with ServerThread(chan_dir) as srv:
        srv.update(snapshot([TEST_VM]))
        time.sleep(0.2)
        assert srv.connections() == 0
        path.unlink()
        fake = FakeQemuChannel(path)
        fake.accept()
        assert fake.request(REQUEST_LF) == expected_reply(TEST_VM)
        fake.close()


def test_refused_socket_is_retried(chan_dir: Path, inotify: bool) -> None:
    """A socket file nobody listens on (stale) is retried and connected once QEMU listens."""
    path = chan_dir / "domain-1-test" / CHANNEL_NAME
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening: connect() is refused
    try:
        with ServerThread(chan_dir, use_inotify=inotify) as srv:
            srv.update(snapshot([TEST_VM]))
            time.sleep(0.3)
            assert srv.connections() == 0
            stale.listen(1)
            stale.settimeout(3.0)
            conn, _ = stale.accept()
            with conn:
                conn.sendall(REQUEST_LF)
                conn.settimeout(5.0)
                buf = b""
                while not buf.endswith(REPLY_TAIL):
                    buf += conn.recv(65536)
                assert buf == expected_reply(TEST_VM)
    finally:
        stale.close()


def test_io_budget_pauses_and_resumes(chan_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over its loop share, channel I/O waits its turn and every request is still answered."""
    import vhostmd_py.publish.virtio.server as virtio

    # A budget so small that each 0.1 s window serves about one request.
    monkeypatch.setattr(virtio, "IO_SHARE", 1e-9)
    five = vms(5)
    fakes = [qemu(chan_dir, "new", vm) for vm in five]
    with ServerThread(chan_dir) as srv:
        srv.update(snapshot(five))
        for fake in fakes:
            fake.accept()
        start = time.monotonic()
        for _ in range(2):
            for fake in fakes:
                fake.send(REQUEST_LF)
            for vm, fake in zip(five, fakes):
                assert fake.read_reply() == expected_reply(vm)
        elapsed = time.monotonic() - start
        # 10 requests at about one per window: the budget really held them back.
        assert elapsed >= 0.5, elapsed
        assert srv.connections() == 5
    for fake in fakes:
        fake.close()


def test_live_xml_path_created_late(chan_dir: Path, inotify: bool) -> None:
    """A live-XML socket whose directory appears later is still connected promptly."""
    xml_sock = chan_dir / "elsewhere" / "deep" / "vm.sock"
    vm = VM(7, "vm0007", "00000000-0000-4000-8000-000000000007", channel_path=str(xml_sock))
    with ServerThread(chan_dir, use_inotify=inotify) as srv:
        srv.update(snapshot([vm]))
        time.sleep(0.3)
        fake = FakeQemuChannel(xml_sock)
        assert fake.accept() < CONNECT_BOUND
        assert fake.request(REQUEST_LF) == expected_reply(vm)
        fake.close()


@pytest.mark.slow  # over 1.5 s: not in the fast tier
def test_idle_discovery_is_event_driven(chan_dir: Path) -> None:
    """With inotify, VMs without a socket cost no periodic scans (polling: one per 50 ms)."""
    twenty = vms(20)
    for vm in twenty:  # their directories exist (say, the guest agent's socket) but not ours
        (chan_dir / channel_dir_name("old", vm)).mkdir()
        (chan_dir / channel_dir_name("old", vm) / "org.qemu.guest_agent.0").touch()
    counts = {}
    for use in (True, False):
        with ServerThread(chan_dir, use_inotify=use) as srv:
            srv.update(snapshot(twenty))
            time.sleep(1.0)
            counts[use] = srv.query(lambda s: s.scans)
            if use:
                # ... and a socket appearing is still found at once, by its event.
                fake = qemu(chan_dir, "old", twenty[3])
                assert fake.accept() < CONNECT_BOUND
                fake.close()
    assert counts[True] <= 2, counts
    assert counts[False] >= 8, counts


def test_policy_view_per_channel(chan_dir: Path) -> None:
    """With a policy (Snapshot.view): each VM's reply is its own view; a blocked VM gets
    the protocol's error only."""
    from dataclasses import replace as _replace

    from vhostmd_py.config.policy import PolicyConfig, Rule
    from vhostmd_py.publish.policy import PolicyView

    a, b, c = vms(3)
    view = PolicyView(PolicyConfig(by_name={a.name: Rule(deny=("Greeting", "Ident")),
                                            c.name: Rule(blocked=True)}))
    fakes = [qemu(chan_dir, "old", vm) for vm in (a, b, c)]
    with ServerThread(chan_dir) as srv:
        srv.update(_replace(snapshot([a, b, c]), view=view))
        for fake in fakes:
            fake.accept()
        answer_only = metric_xml(None, "int32", "Answer", "42")
        assert fakes[0].request(REQUEST_LF) == build_reply(
            answer_only, metric_xml(a, "uint32", "VCpus", "1"))
        assert fakes[1].request(REQUEST_LF) == expected_reply(b)
        assert fakes[2].request(REQUEST_LF) == INVALID_REQUEST
    for fake in fakes:
        fake.close()
