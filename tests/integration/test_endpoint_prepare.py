"""Integration: a real daemon scraped back to back keeps every built-in value of every cycle.

One `vhostmd` process on libvirt's test driver with the golden node of 1000
domains, update period 1 s, built-in sources only (libvirt's statistics:
the SAP profile's four VM metrics, each eight times under other names, so
the values are 32,000 series, as many as the SAP profile gives a node of
8,000 VMs), <freshness/> so a value carried from an earlier cycle says so
(``age=``). One urllib client scrapes OpenMetrics back to back for 12 s
while the metrics disk is read every 50 ms.

Encoding that many values holds the GIL for about a second (the time
between two cycles is about half a second), and the
libvirt worker thread, which gives the GIL back on every libvirt call,
waits for it each time: an encoding beside a cycle's reads made the cycle
publish without fresh values ("libvirt statistics took more than N s: left
out", the previous values carried) or late (a cycle of 1.1 to 1.4 s
instead of 0.5 s: its publish past its period). The endpoint now encodes
values only between cycles (vhostmd_py.publish.endpoint.Quiet), from right
after each one (Preparer): the scrapes wait, the cycles do not. Asserted:
no cycle left values out, every document on the disk holds every metric
with a fresh value, no publish was missed (no gap of two periods), and every
scrape was answered with the values. That encodings wait while a cycle runs
is tests/host/publish/test_endpoint.py's (Quiet, Preparer).
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, List, Tuple

import pytest
from helpers import REPO
from helpers.config import write_config
from helpers.daemon import Vhostmd, try_read, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODE = REPO / "tests" / "data" / "golden" / "upstream" / "nodes" / "node-1000.xml"
VMS = 1000
COPIES = 8
# The SAP profile's VM metrics (conf/sap-vhostmd.conf): libvirt's statistics.
VM_SOURCES = (
    ("TotalCPUTime", "real64", "s", "vm.cpu_time"),
    ("ResourceProcessorLimit", "uint32", None, "vm.vcpus"),
    ("ResourceMemoryLimit", "uint64", "MiB", "vm.memory_max_mib"),
    ("PhysicalMemoryAllocatedToVirtualSystem", "uint64", "MiB", "vm.memory_mib"),
)
SCRAPING = 12.0  # seconds
# A series of the last copy: the values were in the answer.
LAST_SERIES = b"vhostmd_vm_total_cpu_time%d_seconds{" % (COPIES - 1)
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
PUBLISHED = re.compile(rb"<name>PublicationTime</name>\s*<value>([0-9.]+)</value>")


def _metric(name: str, type_: str, context: str, source: str, unit: str | None = None) -> str:
    unit_attr = f' unit="{unit}"' if unit else ""
    return (f'    <metric type="{type_}" context="{context}"{unit_attr}>\n'
            f"      <name>{name}</name>\n      <source>{source}</source>\n    </metric>\n")


class DiskWatch(threading.Thread):
    """Every new document on the disk (read every 50 ms): (PublicationTime, metrics, carried)."""

    def __init__(self, disk: Path) -> None:
        super().__init__(daemon=True)
        self.disk = disk
        self.seen: List[Tuple[float, int, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            content = try_read(self.disk)
            found = PUBLISHED.search(content) if content else None
            if content is None or found is None:
                continue
            published = float(found.group(1))
            if not self.seen or published != self.seen[-1][0]:
                self.seen.append(
                    (published, content.count(b"<metric "), content.count(b"<metric age="))
                )


def test_scraped_back_to_back_every_cycle_keeps_its_values(
    tmp_path: Path, spawn: Callable[..., Vhostmd]
) -> None:
    """No values left out, every document complete and fresh, one a period, while scraped."""
    disk = tmp_path / "disk"
    metrics = [_metric("HostName", "string", "host", "host.nodename")]
    metrics += [_metric(f"{name}{k}", type_, "vm", source, unit)
                for k in range(COPIES) for name, type_, unit, source in VM_SOURCES]
    config = write_config(
        tmp_path / "vhostmd.conf", disk, metrics, size=32768, period=1,
        extra=['<metrics_endpoint address="127.0.0.1" port="0"/>', '<freshness identity="no"/>'],
    )
    daemon = spawn("-d", "-v", "-f", str(config), "-c", f"test://{NODE}")
    port = int(wait_for(
        lambda: re.search(r"serving OpenMetrics on http://127\.0\.0\.1:(\d+)/", daemon.log()),
        30, "the endpoint's start-up line",
    ).group(1))
    wait_for(lambda: re.search(r"cycle 2: ", daemon.log()), 60, "two cycles")
    log_start = len(daemon.log())

    watch = DiskWatch(disk)
    watch.start()
    answers: List[Tuple[int, bool]] = []  # (status, whether the VMs' values were in it)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Accept": OPENMETRICS})
    started = time.time()
    while time.time() < started + SCRAPING:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
            answers.append((response.status, LAST_SERIES in body))
    ended = time.time()
    time.sleep(1.5)  # the cycle under way when scraping ended reaches the disk
    watch.stopped.set()
    watch.join(5)
    log = daemon.log()[log_start:]

    assert answers and all(answer == (200, True) for answer in answers), answers[:5]
    during = [doc for doc in watch.seen if started - 1 <= doc[0] <= ended + 1]
    gaps = [b[0] - a[0] for a, b in zip(during, during[1:])]
    assert "left out" not in log, re.findall(r".*left out.*", log)
    # No publish missed: no gap of two periods (test_endpoint_abuse's bound). How
    # long cycles take beside the scrapes is bench_endpoint_abuse.py's to measure
    # (--control), under whatever load the machine has, not a test's.
    assert len(during) >= SCRAPING // 2, (len(during), gaps)
    assert max(gaps) < 2.0, gaps
    # Complete: HostName, <freshness>' PublicationTime and UpdatePeriod, every VM's, none carried.
    expected = 3 + VMS * COPIES * len(VM_SOURCES)
    assert [(count, carried) for _, count, carried in during] == [(expected, 0)] * len(during)
    print(f"endpoint prepare: {len(answers)} scrapes in {ended - started:.1f} s, "
          f"{len(during)} documents, largest gap {max(gaps):.2f} s")
