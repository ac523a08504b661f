"""The policy step in a daemon: libvirt's metadata-change event takes effect, reads stay rare.

One libvirt test-driver connection is shared by the test and the daemon (each
open of test:///default is its own instance), with libvirt's event loop
running, so a virDomainSetMetadata here is the event the daemon gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any, List

import pytest
from helpers.config import write_config
from helpers.daemon import metrics_of
from vhostmd_wire.disk import read_disk

from vhostmd_py.assemble import Slot
from vhostmd_py.config import Config, load_config
from vhostmd_py.cycle.snapshot import Snapshot
from vhostmd_py.daemon import Daemon
from vhostmd_py.libvirt_host import Host, start_events
from vhostmd_py.sources.metadata import KEY, NAMESPACE
from vhostmd_py.sources.shell.runner import ActionRunner

libvirt = pytest.importorskip("libvirt")
TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # test:///default's running domain


def _runner(config: Config) -> ActionRunner:
    return ActionRunner(path=config.path, uri="test:///default", timeout=10)


class Driver:
    """A step that changes the domain's metadata at given cycles (before the policy step)."""

    reads_stats = False

    def __init__(self, dom: Any, changes: dict) -> None:
        self.dom, self.changes, self.cycle = dom, changes, 0

    async def observe(self, stats: Any) -> None:
        self.cycle += 1
        xml = self.changes.get(self.cycle)
        if xml is not None:
            self.dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, KEY, NAMESPACE,
                                 libvirt.VIR_DOMAIN_AFFECT_LIVE)
            await asyncio.sleep(0.3)  # the event thread delivers it

    def decorate(self, snapshot: Snapshot) -> Snapshot:
        return snapshot

    def reconfigure(self, config: Config) -> bool:
        return True

    def close(self) -> None:
        pass


class Reader:
    """A publisher after the per-VM one: what the VM's own disk holds after each cycle."""

    def __init__(self, path: Path) -> None:
        self.path, self.seen = path, []  # type: ignore[var-annotated]

    def publish(self, snapshot: Snapshot, *, listed: bool) -> None:
        self.seen.append(read_disk(self.path))

    def reconfigure(self, config: Config) -> bool:
        return True

    def close(self) -> None:
        pass


def test_metadata_change_event_applies_without_a_restart_and_reads_stay_rare(
        tmp_path: Path) -> None:
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    assert start_events(libvirt)
    conn = libvirt.open("test:///default")
    try:
        dom = conn.lookupByUUIDString(TEST_UUID)
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, NAMESPACE,
                        libvirt.VIR_DOMAIN_AFFECT_LIVE)
        pervm = tmp_path / "pervm"
        pervm.mkdir()
        conf = write_config(
            tmp_path / "c.xml", tmp_path / "vhostmd0",
            [("Free", "uint64", "host", "echo 42"), ("VCpus", "uint32", "vm", "echo 2")],
            extra=f'<disk_per_vm path="{pervm}/%u"/>',
            after_metrics='<policy refresh="1h"/>\n',
        )
        driver = Driver(dom, {3: "<policy><deny>VCpus</deny></policy>",
                              6: '<policy blocked="yes"/>'})
        reader = Reader(pervm / TEST_UUID)
        daemon = Daemon(load_config(conf), uri="test:///default", runner_factory=_runner,
                        host=Host("test:///default", read_only=conn),
                        extra_slots=[Slot("driver", "step", lambda c: True, lambda c: driver),
                                     Slot("reader", "publisher", lambda c: True,
                                          lambda c: reader)])
        daemon.open_disk()
        start = time.monotonic()
        asyncio.run(daemon.run(max_cycles=9, signals=False))
        assert time.monotonic() - start < 60
        book = daemon.parts.closed["policy"].book  # type: ignore[attr-defined]
    finally:
        # test:///default is one instance per process: leave no metadata of ours behind.
        with contextlib.suppress(libvirt.libvirtError):
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, NAMESPACE,
                            libvirt.VIR_DOMAIN_AFFECT_LIVE)
        with contextlib.suppress(libvirt.libvirtError):  # the daemon closed it at its end
            conn.close()
    names: List[set] = [{n for n, _ in metrics_of(doc)} for doc in reader.seen]
    assert names[:2] == [{"Free", "VCpus"}] * 2  # as upstream until the metadata says more
    # The deny set in cycle 3 applies in that cycle or the next, the block of cycle 6 likewise.
    assert names[2] in ({"Free", "VCpus"}, {"Free"})
    assert names[3:5] == [{"Free"}] * 2
    assert reader.seen[6:] == [b"<metrics>\n</metrics>\n"] * 3
    # One read at first sight, one per change event: never one per cycle.
    assert book.reads == 3
