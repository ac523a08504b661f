"""Built-in sources when libvirt is gone, comes back, or hangs: host metrics never stop.

The same faults as tests/integration/test_daemon_process.py drives with shell
actions, here with every metric a built-in source: /proc values keep coming,
the libvirt ones are left out during the outage and come back with it.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Callable

import pytest
from helpers.config import write_config
from helpers.daemon import Vhostmd, metrics_of, try_read, wait_for

pytestmark = pytest.mark.integration

SOURCE = """    <metric type="{type}" context="{context}">
      <name>{name}</name>
      <source>{field}</source>
    </metric>
"""
NATIVE = (
    ("MemTotal", "uint64", "host", "host.mem_total_mib"),  # /proc: never needs libvirt
    ("Now", "uint64", "host", "host.time"),  # changes every cycle: tells publications apart
    ("NodeCPUs", "uint32", "host", "host.cpus"),  # libvirt's node info
    ("VCPUs", "uint32", "vm", "vm.vcpus"),  # libvirt, per VM
)


def _native_config(path: Path, disk: Path) -> Path:
    metrics = [SOURCE.format(name=n, type=t, context=c, field=f) for n, t, c, f in NATIVE]
    return write_config(path, disk, metrics, period=1)


def _mem_total_mib() -> str:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return str(int(line.split()[1]) // 1024)
    raise AssertionError("no MemTotal in /proc/meminfo")


def test_libvirt_gone_then_back_with_builtin_sources(
    upstream: Path, tmp_path: Path, spawn: Callable[..., Vhostmd]
) -> None:
    """No libvirt: /proc values every cycle, libvirt's left out; then libvirt's come back."""
    disk = tmp_path / "vhostmd0"
    node = tmp_path / "node.xml"  # missing at first: the test driver cannot open it
    config = _native_config(tmp_path / "vhostmd.conf", disk)
    daemon = spawn("-d", "-v", "-f", str(config), "-c", f"test://{node}")
    first = wait_for(lambda: try_read(disk), 15, "host metrics without libvirt")
    assert metrics_of(first)[("MemTotal", "host")] == _mem_total_mib()
    assert ("NodeCPUs", "host") not in metrics_of(first)  # left out, never empty
    seen = {first}
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:  # publication goes on through the outage
        content = try_read(disk)
        if content is not None:
            seen.add(content)
        time.sleep(0.05)
    assert len(seen) >= 2, daemon.log()
    node.write_bytes((upstream / "nodes" / "node-1.xml").read_bytes())
    back = wait_for(
        lambda: (c := try_read(disk)) and b"VCPUs" in c and b"NodeCPUs" in c and c,
        10, "libvirt's values back",
    )
    values = metrics_of(back)
    assert values[("MemTotal", "host")] == _mem_total_mib()
    assert int(values[("NodeCPUs", "host")]) > 0
    assert values[("VCPUs", "1")] is not None and int(values[("VCPUs", "1")]) >= 1
    assert daemon.stop()[0] == 0


def test_hung_libvirtd_does_not_stop_builtin_host_metrics(
    tmp_path: Path, spawn: Callable[..., Vhostmd]
) -> None:
    """A libvirtd that accepts and never answers: the /proc values still come every cycle."""
    sock_path = tmp_path / "libvirt-sock"
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(str(sock_path))
    hung.listen(16)  # accepted by the kernel, never answered: a wedged libvirtd
    disk = tmp_path / "vhostmd0"
    config = _native_config(tmp_path / "vhostmd.conf", disk)
    try:
        daemon = spawn("-d", "-f", str(config), "-c", f"qemu+unix:///system?socket={sock_path}")
        first = wait_for(lambda: try_read(disk), 10, "a publish despite the hung libvirtd")
        assert metrics_of(first)[("MemTotal", "host")] == _mem_total_mib()
        assert ("NodeCPUs", "host") not in metrics_of(first)
        wait_for(lambda: (c := try_read(disk)) and c != first, 4, "the next cycle's publish")
        code, took = daemon.stop()
        assert code == 0 and took < 2.0, daemon.log()
    finally:
        hung.close()
