"""vhostmd_py.libvirt_host: the one libvirt boundary, against libvirt's test driver."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import libvirt
import pytest

from vhostmd_py.errors import LibvirtError, ShapingError
from vhostmd_py.libvirt_host import Host
from vhostmd_py.monitors.accounting import LibvirtShaper
from vhostmd_py.sources.vms import LibvirtVMs

TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # test:///default's running domain


def test_read_write_connection_is_opened_once_on_first_use() -> None:
    """Nothing is opened until asked; the same read-write connection serves every caller."""
    host = Host("test:///default")
    try:
        assert not host.connected
        conn = host.read_write()
        assert host.read_write() is conn
        assert not host.connected  # the read-only one is apart, still unopened
        assert host.read_only() is not conn and host.connected
    finally:
        host.close()
    assert not host.connected


def test_an_unreachable_uri_is_a_product_error(tmp_path: Path) -> None:
    """read_write() raises LibvirtError naming the URI, with libvirt's error code."""
    uri = f"test://{tmp_path / 'missing.xml'}"
    with pytest.raises(LibvirtError) as err:
        Host(uri).read_write()
    assert err.value.uri == uri
    assert str(err.value).startswith(f"libvirt {uri}: ")
    assert err.value.code is not None and err.value.code != 0
    assert Host(uri).read_only() is None  # the read-only side logs the outage instead


def test_worker_calls_translate_libvirt_errors() -> None:
    """A libvirtError raised on the worker thread comes back as LibvirtError (code kept)."""
    host = Host("test:///default")

    def lookup() -> Any:
        return host.read_only().lookupByName("no-such-domain")

    async def main() -> LibvirtError:
        with pytest.raises(LibvirtError) as err:
            await host.call(lookup)
        return err.value

    try:
        error = asyncio.run(main())
    finally:
        host.worker.shutdown()
        host.close()
    assert error.code == libvirt.VIR_ERR_NO_DOMAIN
    assert host.is_error(error, "VIR_ERR_NO_DOMAIN")


def test_lister_and_shaper_share_one_host() -> None:
    """The lister reads through the Host's read-only connection, the shaper changes a
    domain through its read-write one; closing either leaves the shared Host's to it."""
    host = Host("test:///default")
    try:
        vms = LibvirtVMs(host.uri, host=host)
        assert [vm.uuid for vm in vms.list_running()] == [TEST_UUID]
        shaper = LibvirtShaper(host.uri, host=host)
        with pytest.raises(ShapingError) as err:
            shaper.get("00000000-0000-0000-0000-000000000000", "vnet0")
        assert err.value.gone
        vms.close()
        shaper.close()
        assert host.connected  # the Host's own, closed by its owner
    finally:
        host.close()
