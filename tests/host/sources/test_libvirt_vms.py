"""vhostmd_py.sources.vms against libvirt's in-process test driver (no mocks)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Iterator

import libvirt
import pytest
from helpers import DATA

from vhostmd_py.sources.vm import VM
from vhostmd_py.sources.vms import LibvirtVMs, channel_path_from_xml

CHANNEL_NODE = DATA / "nodes" / "node-channel.xml"
VHOSTMD_SOCKET = (
    "/var/lib/libvirt/qemu/channel/target/domain-1-with-channel/org.github.vhostmd.1"
)

# test:///default keeps one driver state per process: domains created here are
# visible to every connection of this pytest process, so each test cleans up.
EXTRA_DOMAIN = """<domain type='test'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='KiB'>65536</memory>
  <vcpu>1</vcpu>
  <os><type arch='i686'>hvm</type></os>
  <devices>
    <channel type='unix'>
      <source mode='bind' path='/run/chan/{name}/org.github.vhostmd.1'/>
      <target type='virtio' name='org.github.vhostmd.1'/>
    </channel>
  </devices>
</domain>"""


@pytest.fixture()
def default_conn() -> Iterator[libvirt.virConnect]:
    """A second connection to test:///default, to start and stop domains."""
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


def test_default_driver_lists_the_test_domain() -> None:
    """test:///default has one running domain: id 1, name test, upstream's uuid."""
    vms = LibvirtVMs("test:///default")
    try:
        assert vms.list_running() == [
            VM(id=1, name="test", uuid="6695eb01-f6a4-8304-79aa-97f2502e193f")
        ]
    finally:
        vms.close()


def test_node_100_lists_every_domain(upstream: Path) -> None:
    """node-100.xml: ids 1..100 in file order, names vm%04d, uuids as FACTS.md says."""
    vms = LibvirtVMs(f"test://{upstream / 'nodes' / 'node-100.xml'}")
    try:
        listed = vms.list_running()
    finally:
        vms.close()
    assert len(listed) == 100
    for vm in listed:
        assert vm.name == f"vm{vm.id:04d}"
        assert vm.uuid == f"00000000-0000-4000-8000-{vm.id:012d}"
        assert vm.channel_path is None
    assert sorted(vm.id for vm in listed) == list(range(1, 101))


def test_order_is_libvirts_listing_order(upstream: Path) -> None:
    """The VMs come in listDomainsID() order of the same driver state, not sorted."""
    uri = f"test://{upstream / 'nodes' / 'node-1000.xml'}"
    vms = LibvirtVMs(uri)
    try:
        listed = [vm.id for vm in vms.list_running()]
        conn = vms.connection()  # the same connection: the same hash-ordered listing
        assert listed == conn.listDomainsID()
        assert listed != sorted(listed)
    finally:
        vms.close()


def test_channel_paths_from_live_xml() -> None:
    """want_channels takes the org.github.vhostmd.1 socket, other channels ignored."""
    vms = LibvirtVMs(f"test://{CHANNEL_NODE}", want_channels=True)
    try:
        by_name = {vm.name: vm for vm in vms.list_running()}
    finally:
        vms.close()
    assert by_name["with-channel"].channel_path == VHOSTMD_SOCKET
    assert by_name["no-channel"].channel_path is None


def test_channel_xml_fetched_once_and_pruned(default_conn: libvirt.virConnect) -> None:
    """The channel path is cached per (id, uuid) and forgotten when the domain stops."""
    uuid = "11111111-2222-4333-8444-555555555555"
    vms = LibvirtVMs("test:///default", want_channels=True)
    dom = default_conn.createXML(EXTRA_DOMAIN.format(name="chan-a", uuid=uuid), 0)
    try:
        first = {vm.name: vm for vm in vms.list_running()}
        assert first["chan-a"].channel_path == "/run/chan/chan-a/org.github.vhostmd.1"
        assert (dom.ID(), uuid) in vms._channels
        assert {vm.name: vm for vm in vms.list_running()} == first
        dom.destroy()
        dom = None
        second = vms.list_running()
        assert [vm.name for vm in second] == ["test"]
        assert all(key[1] != uuid for key in vms._channels)
    finally:
        if dom is not None:
            dom.destroy()
        vms.close()


def test_new_domain_appears_and_stopped_one_disappears(default_conn: libvirt.virConnect) -> None:
    """Each call reflects the domains running now (no stale listing)."""
    vms = LibvirtVMs("test:///default")
    uuid = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
    try:
        dom = default_conn.createXML(EXTRA_DOMAIN.format(name="transient", uuid=uuid), 0)
        names = [vm.name for vm in vms.list_running()]
        assert "transient" in names
        dom.destroy()
        assert [vm.name for vm in vms.list_running()] == ["test"]
    finally:
        vms.close()


def test_outage_logged_once_then_restored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Unreachable libvirt: [] every call, one error per outage, one info when back."""
    node = tmp_path / "node.xml"
    uri = f"test://{node}"
    vms = LibvirtVMs(uri)
    caplog.set_level(logging.DEBUG, logger="vhostmd_py.libvirt_host")
    try:
        for _ in range(5):
            assert vms.list_running() == []
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert errors[0].getMessage().startswith(f"Unable to open libvirt connection to {uri}: ")
        shutil.copy(CHANNEL_NODE, node)
        assert {vm.name for vm in vms.list_running()} == {"with-channel", "no-channel"}
        assert len(vms.list_running()) == 2
        infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert infos.count(f"libvirt connection to {uri} restored") == 1
    finally:
        vms.close()


def test_close_then_list_reconnects(upstream: Path) -> None:
    """close() is idempotent and a later call opens a fresh connection."""
    vms = LibvirtVMs(f"test://{upstream / 'nodes' / 'node-1.xml'}")
    vms.close()
    vms.close()
    assert [vm.name for vm in vms.list_running()] == ["vm0001"]
    assert vms.connected
    vms.close()
    assert not vms.connected


def test_libvirt_errors_are_not_printed(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """libvirt's default "libvirt: ... error" line on stderr is silenced; we log instead."""
    vms = LibvirtVMs(f"test://{tmp_path / 'missing.xml'}")
    assert vms.list_running() == []
    assert "libvirt: " not in capfd.readouterr().err


def test_channel_path_from_xml_edge_cases() -> None:
    """Malformed XML, a channel without source, or another target name give None."""
    assert channel_path_from_xml("<domain><devices>") is None
    assert channel_path_from_xml("<domain/>") is None
    no_source = (
        "<domain><devices><channel type='unix'>"
        "<target type='virtio' name='org.github.vhostmd.1'/></channel></devices></domain>"
    )
    assert channel_path_from_xml(no_source) is None
    other = (
        "<domain><devices><channel type='unix'><source path='/x'/>"
        "<target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices></domain>"
    )
    assert channel_path_from_xml(other) is None
