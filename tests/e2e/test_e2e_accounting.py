"""Enforcement against the real libvirt daemon: --config tuning of a defined (not running) domain.

The fixture ``libvirtd`` (tests/e2e/conftest.py) gives the URI of a private
libvirtd (its own virtlogd, configuration and state; the packages installed
first when missing), stopped at the end of this module. The domain is
defined and undefined here.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import libvirt
import pytest

from vhostmd_py.config import AccountingConfig, Budget
from vhostmd_py.monitors.accounting import Accounting, LibvirtShaper
from vhostmd_py.sources.stats import CycleStats, HostStats, NetStats, VmStats

pytestmark = pytest.mark.e2e

UUID = "00000000-0000-4000-8000-0000000ac001"
NAME = "vhostmd-py-e2e-accounting"
MAC = "52:54:00:ac:00:01"
DOMAIN = f"""<domain type='qemu'>
  <name>{NAME}</name>
  <uuid>{UUID}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <interface type='ethernet'>
      <mac address='{MAC}'/>
      <model type='virtio'/>
      <bandwidth><outbound average='1000' peak='2000' burst='512'/></bandwidth>
    </interface>
  </devices>
</domain>
"""


@pytest.fixture
def conn(libvirtd: str) -> Iterator[Any]:
    """A read-write connection to the private libvirtd (qemu:///system?socket=...)."""
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    try:
        c = libvirt.open(libvirtd)
    except libvirt.libvirtError as err:
        pytest.fail(f"{libvirtd} answers virsh but not libvirt.open: {err}")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def domain(conn: Any) -> Iterator[Any]:
    """A defined, never started domain with one interface (left over ones are replaced)."""
    with contextlib.suppress(libvirt.libvirtError):
        conn.lookupByName(NAME).undefine()
    dom = conn.defineXML(DOMAIN)
    try:
        yield dom
    finally:
        dom.undefine()


def _snap(wall: float, tx: int) -> CycleStats:
    vm = VmStats(uuid=UUID, name=NAME, id=-1, nics=(NetStats(MAC, rx_bytes=0, tx_bytes=tx),))
    return CycleStats(wall=wall, mono=wall, host=HostStats(), vms=(vm,))


def test_cap_and_restore_with_affect_config(domain: Any, libvirtd: str, tmp_path: Path) -> None:
    """The budget's average is applied with --config; the period's end restores the originals."""
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    original = domain.interfaceParameters(MAC, flags)
    assert original["outbound.average"] == 1000
    budget = Budget(tx=50 * 1024 * 100, enforce=True)  # 50 KiB/s over a 100 s period
    config = AccountingConfig(period=100, period_offset=0, state_dir=str(tmp_path),
                              guest_metrics=False, budget=budget, overrides=())
    shaper = LibvirtShaper(libvirtd, flags=flags)
    acct = Accounting(config, shaper=shaper, boot_id="b")
    try:
        acct.update(_snap(1000, 0))
        acct.update(_snap(1010, budget.tx or 0))
        capped = domain.interfaceParameters(MAC, flags)
        assert (capped["outbound.average"], capped["outbound.peak"]) == (50, 50)
        assert "<outbound average='50' peak='50'" in domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        stored = json.loads((tmp_path / "accounting.json").read_text())["vms"][UUID]["capped"]
        assert stored[MAC] == original
        acct.update(_snap(1100, (budget.tx or 0) + 1))
        back = domain.interfaceParameters(MAC, flags)
        assert {k: v for k, v in back.items() if k.startswith("outbound")} == {
            k: v for k, v in original.items() if k.startswith("outbound")}
    finally:
        shaper.close()
