"""Per-VM disks: the libvirt hook run for real, the daemon with its VMs."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import uuid as uuid_mod
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
from helpers import REPO
from helpers.monitor import fast_clock
from helpers.pervm import write_conf
from lxml import etree
from vhostmd_wire.disk import read_disk, read_header

from vhostmd_py.config import PerVmDiskConfig, load_config
from vhostmd_py.cycle.render import EMPTY_DOCUMENT, render_metric
from vhostmd_py.cycle.snapshot import Snapshot, VmBlock
from vhostmd_py.daemon import Daemon
from vhostmd_py.errors import ConfigError, DiskIOError
from vhostmd_py.publish.pervm import PerVmDisks, check_directory
from vhostmd_py.sources.shell.runner import ActionRunner
from vhostmd_py.sources.vm import VM

HOOK = REPO / "conf" / "libvirt-hook-qemu"
NODES = REPO.parent / "shared" / "golden" / "upstream" / "nodes"  # ../shared beside the checkout
if not NODES.is_dir():
    NODES = REPO / "tests" / "data" / "golden" / "upstream" / "nodes"

def domain_xml(uuid: str, name: str = "guest") -> bytes:
    """A domain XML as libvirt gives it to the hook (name and UUID are what matter)."""
    return (f"<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid>"
            "<devices/></domain>").encode()


def run_hook(conf: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The hook as libvirt runs it: HOOK NAME OP SUBOP EXTRA, the domain XML on stdin."""
    return subprocess.run([sys.executable, str(HOOK), *args], input=stdin, capture_output=True,
                          env={"VHOSTMD_CONF": str(conf), "PATH": "/usr/bin:/bin"},
                          timeout=30, check=False)


def uuids_in(doc: bytes) -> set[str]:
    """The uuid attributes of a document's vm metrics."""
    return {str(m.get("uuid")) for m in etree.fromstring(doc).iter("metric")
            if m.get("context") == "vm"}


# --- the hook ----------------------------------------------------------------


def test_hook_prepare_creates_an_empty_disk_release_removes_it(tmp_path: Path) -> None:
    """prepare begin: the UUID's file, readable at once as an empty document, 0644, sized."""
    conf = write_conf(tmp_path, f'<disk_per_vm path="{tmp_path}/pervm/%u" size="128" unit="k"/>')
    uuid = str(uuid_mod.uuid4())
    # A name that would escape the directory if it ever reached a path.
    xml = domain_xml(uuid, name="../../evil")
    proc = run_hook(conf, "../../evil", "prepare", "begin", "-", stdin=xml)
    assert proc.returncode == 0, proc.stderr
    disk = tmp_path / "pervm" / uuid
    st = disk.stat()
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_size == 128 * 1024
    assert stat.S_IMODE((tmp_path / "pervm").stat().st_mode) == 0o755
    assert read_header(disk, direct=False).busy == 0
    assert read_disk(disk, direct=False, busy_timeout=0.1) == EMPTY_DOCUMENT
    assert sorted(os.listdir(tmp_path / "pervm")) == [uuid]  # no temporary left
    assert not (tmp_path.parent / "evil").exists()
    # Other operations do nothing, whatever is on stdin.
    for op in (("start", "begin"), ("started", "begin"), ("stopped", "end"), ("release", "begin")):
        assert run_hook(conf, "guest", *op, "-", stdin=xml).returncode == 0
        assert disk.exists()
    proc = run_hook(conf, "guest", "release", "end", "-", stdin=xml)
    assert proc.returncode == 0, proc.stderr
    assert not disk.exists()


def test_hook_replaces_a_planted_symlink_without_following_it(tmp_path: Path) -> None:
    """A symlink at the disk's path is replaced; its target is never written."""
    conf = write_conf(tmp_path, f'<disk_per_vm path="{tmp_path}/pervm/%u"/>')
    uuid = str(uuid_mod.uuid4())
    (tmp_path / "pervm").mkdir(mode=0o755)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "pervm" / uuid).symlink_to(victim)
    proc = run_hook(conf, "g", "prepare", "begin", "-", stdin=domain_xml(uuid))
    assert proc.returncode == 0, proc.stderr
    assert victim.read_bytes() == b"precious"
    disk = tmp_path / "pervm" / uuid
    assert not disk.is_symlink() and disk.stat().st_size == 64 * 1024  # the shared disk's size
    assert read_disk(disk, direct=False, busy_timeout=0.1) == EMPTY_DOCUMENT


def test_hook_refuses_a_directory_others_may_write(tmp_path: Path) -> None:
    """A group/world-writable directory: no disk; the start fails only if the domain uses it."""
    conf = write_conf(tmp_path, f'<disk_per_vm path="{tmp_path}/pervm/%u"/>')
    (tmp_path / "pervm").mkdir()
    os.chmod(tmp_path / "pervm", 0o777)
    uuid = str(uuid_mod.uuid4())
    unused = run_hook(conf, "g", "prepare", "begin", "-", stdin=domain_xml(uuid))
    assert unused.returncode == 0 and b"writable by nobody else" in unused.stderr
    uses = domain_xml(uuid).replace(
        b"<devices/>", f"<devices><disk><source file='{tmp_path}/pervm/{uuid}'/></disk>"
        "</devices>".encode())
    proc = run_hook(conf, "g", "prepare", "begin", "-", stdin=uses)
    assert proc.returncode == 1 and b"writable by nobody else" in proc.stderr
    assert not (tmp_path / "pervm" / uuid).exists()


def test_hook_without_disk_per_vm_does_nothing(tmp_path: Path) -> None:
    """An upstream config: the hook exits 0 and creates nothing."""
    conf = write_conf(tmp_path, "")
    proc = run_hook(conf, "g", "prepare", "begin", "-", stdin=domain_xml(str(uuid_mod.uuid4())))
    assert proc.returncode == 0 and proc.stderr == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vhostmd.conf"]


# --- config ------------------------------------------------------------------


def test_config_disk_per_vm_defaults_and_values(tmp_path: Path) -> None:
    """Size defaults to the shared disk's, grace to the expiration time; explicit values win."""
    cfg = load_config(write_conf(tmp_path, '<disk_per_vm path="/dev/shm/vhostmd/%u"/>'))
    assert cfg.disk_per_vm == PerVmDiskConfig("/dev/shm/vhostmd/%u", 64 * 1024, 15)
    assert cfg.disk_per_vm.path_for("abc") == "/dev/shm/vhostmd/abc"
    cfg = load_config(write_conf(
        tmp_path, '<disk_per_vm path="/dev/shm/vhostmd/vm-%u.img" size="1" unit="m" grace="2m"/>'))
    assert cfg.disk_per_vm == PerVmDiskConfig("/dev/shm/vhostmd/vm-%u.img", 1 << 20, 120)


@pytest.mark.parametrize(("attrs", "reason"), [
    ('path="/dev/shm/vhostmd/%n"', "exactly once"),
    ('path="/dev/shm/%u/disk"', "exactly once"),
    ('path="/dev/shm/vhostmd/%u-%u"', "exactly once"),
    ('path="/dev/shm/vhostmd/%u%n"', "only %u"),
    ('path="vhostmd/%u"', "absolute"),
    ('path="/dev/shm/../tmp/%u"', "absolute"),
    ('path="/%u"', "directory of their own"),
    ('path="/dev/shm/vhostmd/%u" size="12"', "not within supported range"),
    ('path="/dev/shm/vhostmd/%u" unit="k"', "without a size"),
    ('path="/dev/shm/vhostmd/%u" grace="0"', "out of range"),
    ('size="64" unit="k"', "fails DTD validation"),
])
def test_config_disk_per_vm_errors_name_the_line(tmp_path: Path, attrs: str, reason: str) -> None:
    """Every bad disk_per_vm is refused with file:line."""
    path = write_conf(tmp_path, f"<disk_per_vm {attrs}/>")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert reason in str(info.value)
    assert info.value.line == 13 and str(path) in str(info.value)


# --- the disks in the daemon ---------------------------------------------------


def _runner(config: object) -> ActionRunner:
    return ActionRunner(path="/usr/bin:/bin", uri=None, timeout=10)


def test_daemon_fills_one_disk_per_vm_with_its_own_metrics_only(tmp_path: Path) -> None:
    """node-10 (ten running VMs): ten disks, each with the host's metrics and its own UUID only."""
    pervm = tmp_path / "pervm"
    conf = load_config(write_conf(tmp_path, f'<disk_per_vm path="{pervm}/%u" size="8" unit="k"/>'))
    daemon = Daemon(conf, uri=f"test://{NODES / 'node-10.xml'}", runner_factory=_runner)
    daemon.open_disk()
    asyncio.run(daemon.run(max_cycles=1, signals=False))
    uuids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(1, 11)]
    assert sorted(os.listdir(pervm)) == uuids
    shared = read_disk(tmp_path / "vhostmd0", direct=False)
    assert uuids_in(shared) == set(uuids)  # the shared disk keeps every VM
    for index, uuid in enumerate(uuids, 1):
        doc = read_disk(pervm / uuid, direct=False)
        assert uuids_in(doc) == {uuid}
        assert b"<name>HostTag</name>\n    <value>host-tag</value>" in doc
        assert f"<value>vm{index:04d}-".encode() in doc and f"-{uuid}</value>".encode() in doc
        assert stat.S_IMODE((pervm / uuid).stat().st_mode) == 0o644


@pytest.fixture
def second_vm() -> Iterator[Tuple[object, str]]:
    """A second running domain in the process's shared test:///default driver."""
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open("test:///default")
    dom = conn.defineXML("<domain type='test'><name>pervm-second</name><memory>8192</memory>"
                         "<os><type>hvm</type></os></domain>")
    dom.create()
    try:
        yield dom, dom.UUIDString()
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
        conn.close()


def test_daemon_retires_the_disk_of_a_gone_vm_after_the_grace(
        tmp_path: Path, second_vm: Tuple[object, str]) -> None:
    """Two VMs, one destroyed: its disk stays one cycle (grace), then is closed and removed."""
    dom, gone = second_vm
    pervm = tmp_path / "pervm"
    conf = load_config(write_conf(
        tmp_path, f'<disk_per_vm path="{pervm}/%u" size="8" unit="k" grace="1s"/>'))
    daemon = Daemon(conf, uri="test:///default", runner_factory=_runner, clock=fast_clock())
    daemon.open_disk()
    seen: List[List[str]] = []

    async def main() -> None:
        task = asyncio.ensure_future(daemon.run(max_cycles=4, signals=False))
        while daemon.cycles < 1:
            await asyncio.sleep(0.005)
        seen.append(sorted(os.listdir(pervm)))
        dom.destroy()  # type: ignore[attr-defined]
        while daemon.cycles < 2:
            await asyncio.sleep(0.005)
        seen.append(sorted(os.listdir(pervm)))
        await task
        seen.append(sorted(os.listdir(pervm)))

    asyncio.run(main())
    stays = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # test:///default's own VM
    assert seen[0] == sorted([stays, gone])
    assert gone in seen[1]  # gone for less than the grace at that cycle
    assert seen[2] == [stays]
    assert uuids_in(read_disk(pervm / stays, direct=False)) == {stays}


def _snapshot(*vms: VM) -> Snapshot:
    host = render_metric("string", "H", b"h", None, None)
    return Snapshot(host, tuple(VmBlock(vm, render_metric("string", "V", vm.uuid.encode(), vm,
                                                          None)) for vm in vms))


def test_pervm_grace_and_unlisted_cycles(tmp_path: Path) -> None:
    """A VM gone for less than the grace keeps its disk; libvirt not answering retires nothing."""
    now = [0.0]
    a = VM(1, "a", "00000000-0000-4000-8000-00000000000a")
    b = VM(2, "b", "00000000-0000-4000-8000-00000000000b")
    disks = PerVmDisks(PerVmDiskConfig(f"{tmp_path}/d/%u", 4096, 10), max_disks=8,
                       clock=lambda: now[0])
    disks.open()
    disks.publish(_snapshot(a, b))
    assert set(disks.uuids) == {a.uuid, b.uuid}
    assert uuids_in(read_disk(tmp_path / "d" / b.uuid, direct=False)) == {b.uuid}
    now[0] = 100.0
    disks.publish(_snapshot(), listed=False)  # libvirt down: nobody is gone
    disks.publish(_snapshot(a))
    now[0] = 109.0
    disks.publish(_snapshot(a))
    assert (tmp_path / "d" / b.uuid).exists()
    now[0] = 110.0
    disks.publish(_snapshot(a))
    assert not (tmp_path / "d" / b.uuid).exists() and disks.uuids == (a.uuid,)
    disks.close()
    assert (tmp_path / "d" / a.uuid).exists()  # stop leaves the files to the guests


def test_pervm_bounds_the_number_and_refuses_odd_uuids(tmp_path: Path) -> None:
    """At most max_disks disks; a UUID not in canonical form never becomes a path."""
    disks = PerVmDisks(PerVmDiskConfig(f"{tmp_path}/d/%u", 4096, 10), max_disks=2)
    vms = [VM(i, f"v{i}", f"00000000-0000-4000-8000-00000000000{i}") for i in range(1, 4)]
    disks.publish(_snapshot(*vms, VM(9, "x", "../../etc/passwd")))
    assert sorted(os.listdir(tmp_path / "d")) == [vms[0].uuid, vms[1].uuid]
    disks.close()


def test_pervm_directory_must_be_private(tmp_path: Path) -> None:
    """A directory others may write is refused before any disk is made in it."""
    (tmp_path / "d").mkdir()
    os.chmod(tmp_path / "d", 0o1777)
    with pytest.raises(DiskIOError, match="writable by group or others"):
        check_directory(str(tmp_path / "d"))
    disks = PerVmDisks(PerVmDiskConfig(f"{tmp_path}/d/%u", 4096, 10), max_disks=2)
    disks.publish(_snapshot(VM(1, "a", "00000000-0000-4000-8000-00000000000a")))
    assert os.listdir(tmp_path / "d") == []
