"""Integration: the OpenMetrics endpoint of a real `vhostmd` process, scraped over HTTP.

A real daemon against libvirt's test driver (a node XML file with a VM whose
name holds a quote, a newline and braces), scraped with urllib and parsed with
prometheus_client's OpenMetrics parser (strict: it refuses a malformed line).
"""

from __future__ import annotations

import re
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
from helpers.config import Metric, metric_xml, write_config
from helpers.daemon import Vhostmd, try_read, wait_for
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as text_format_families

pytestmark = pytest.mark.integration

ODD_NAME = 'a"b\nc{x="y"}'
ODD_UUID = "00000000-0000-4000-8000-0000000000a1"
PLAIN_UUID = "00000000-0000-4000-8000-0000000000a2"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

DOMAIN = """  <domain type='test'>
    <name>{name}</name>
    <uuid>{uuid}</uuid>
    <memory unit='KiB'>1048576</memory>
    <vcpu>1</vcpu>
    <os><type arch='x86_64'>hvm</type></os>
  </domain>
"""

METRICS: List[Metric] = [
    ("FreeMemory", "uint64", "host", "echo 3"),
    ("HostName", "string", "host", "echo host-1"),
    ("TotalCPUTime", "real64", "vm", "echo 1.5"),
    ("Ident", "string", "vm", "echo NAME"),
    ("Broken", "uint32", "vm", "exit 3"),
]


def _xml_text(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\n", "&#10;"))


def write_node(path: Path) -> str:
    """A test-driver node with the odd VM (id 1) and a plain one (id 2); its URI."""
    domains = DOMAIN.format(name=_xml_text(ODD_NAME), uuid=ODD_UUID) + DOMAIN.format(
        name="plain", uuid=PLAIN_UUID
    )
    path.write_text(f"<node>\n  <memory>16777216</memory>\n{domains}</node>\n")
    return f"test://{path}"


def endpoint_config(tmp_path: Path, port: int) -> Path:
    # Units: FreeMemory MiB (scaled to bytes), TotalCPUTime seconds.
    units = {"FreeMemory": "MiB", "TotalCPUTime": "s"}
    metrics = [metric_xml(*metric, unit=units.get(metric[0])) for metric in METRICS]
    return write_config(tmp_path / "vhostmd.conf", tmp_path / "disk", metrics,
                        extra=f'<metrics_endpoint address="127.0.0.1" port="{port}"/>')


def endpoint_port(daemon: Vhostmd) -> int:
    found = wait_for(
        lambda: re.search(r"serving OpenMetrics on http://127\.0\.0\.1:(\d+)/metrics",
                          daemon.log()),
        15, "the endpoint's start-up line",
    )
    return int(found.group(1))


def scrape(port: int, accept: str | None = OPENMETRICS) -> Tuple[str, str]:
    """(Content-Type, body) of GET /metrics."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if accept is not None:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode("utf-8")


def families(text: str) -> Dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_scraped_and_parsed_with_odd_vm_name(tmp_path: Path,
                                             spawn: Callable[..., Vhostmd]) -> None:
    """Every value as a series, the odd VM name one label value, health counters moving."""
    uri = write_node(tmp_path / "node.xml")
    daemon = spawn("-d", "-f", str(endpoint_config(tmp_path, 0)), "-c", uri)
    port = endpoint_port(daemon)
    wait_for(lambda: try_read(tmp_path / "disk"), 15, "the first publish")

    def two_cycles() -> Dict[str, object] | None:
        kind, body = scrape(port)
        assert kind.startswith("application/openmetrics-text"), kind
        got = families(body)  # the strict parser: raises on any malformed line
        hist = got["vhostmd_cycle_duration_seconds"]
        count = next(s.value for s in hist.samples if s.name.endswith("_count"))  # type: ignore[attr-defined]
        return got if count >= 2 else None

    got = wait_for(two_cycles, 15, "two cycles on the endpoint")

    cpu = got["vhostmd_vm_total_cpu_time_seconds"]
    assert cpu.type == "gauge"  # type: ignore[attr-defined]
    by_uuid = {s.labels["vm_uuid"]: s for s in cpu.samples}  # type: ignore[attr-defined]
    assert set(by_uuid) == {ODD_UUID, PLAIN_UUID}
    odd = by_uuid[ODD_UUID]
    # The labels the guest's vm-dump-metrics gives too (vhostmd_wire.openmetrics.vm_labels).
    assert odd.labels == {"vm_uuid": ODD_UUID, "vm_id": "1"}
    assert odd.value == 1.5
    # The names, once per VM: one label value holding the whole name, none injected.
    vm_names = {s.labels["vm_uuid"]: s.labels  # type: ignore[attr-defined]
                for s in got["vhostmd_vm"].samples}
    assert vm_names[ODD_UUID] == {"vm_name": ODD_NAME, "vm_uuid": ODD_UUID, "vm_id": "1"}
    assert vm_names[PLAIN_UUID]["vm_name"] == "plain"

    # A string metric: an info metric, the value in a label (NAME substituted: the odd name).
    ident = got["vhostmd_vm_ident"]
    assert ident.type == "info"  # type: ignore[attr-defined]
    odd_ident = next(s for s in ident.samples if s.labels["vm_uuid"] == ODD_UUID)  # type: ignore[attr-defined]
    assert odd_ident.labels == {"value": ODD_NAME, "vm_uuid": ODD_UUID, "vm_id": "1"}

    host_mem = got["vhostmd_host_free_memory_bytes"]
    assert [(s.labels, s.value) for s in host_mem.samples] == [({}, 3 * 1024 * 1024)]  # type: ignore[attr-defined]
    assert [s.labels for s in got["vhostmd_host_name"].samples] == [{"value": "host-1"}]  # type: ignore[attr-defined]
    assert "vhostmd_vm_broken" not in got  # its action fails: no value, no series

    def value(name: str) -> float:
        return float(got[name].samples[0].value)  # type: ignore[attr-defined]

    # 2 host + 3 per VM = 8 actions a cycle, 2 of them failing (Broken, one per VM).
    cycles = next(s.value for s in got["vhostmd_cycle_duration_seconds"].samples  # type: ignore[attr-defined]
                  if s.name.endswith("_count"))
    assert value("vhostmd_actions") >= 8 * cycles
    assert value("vhostmd_action_failures") >= 2 * cycles
    assert value("vhostmd_action_failures") <= value("vhostmd_actions") / 4 + 2
    assert value("vhostmd_action_timeouts") == 0
    assert value("vhostmd_publish_errors") == 0
    assert value("vhostmd_vms") == 2
    assert value("vhostmd_virtio_channels_connected") == 0
    assert value("vhostmd_last_publish_timestamp_seconds") > 1.5e9

    # Without an Accept header: the Prometheus text format, same odd label value.
    kind, body = scrape(port, accept=None)
    assert kind.startswith("text/plain"), kind
    plain = {f.name: f for f in text_format_families(body)}
    names = {s.labels["vm_name"] for s in plain["vhostmd_vm_info"].samples}
    assert names == {ODD_NAME, "plain"}

    code, _ = daemon.stop(signal.SIGTERM)
    assert code == 0
    with pytest.raises(urllib.error.URLError):
        scrape(port)  # closed at shutdown


def test_port_in_use_is_a_start_up_failure(tmp_path: Path,
                                          spawn: Callable[..., Vhostmd]) -> None:
    """The endpoint binds during start-up: a taken port fails the start, exit 1, said why."""
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        daemon = spawn("-d", "-f", str(endpoint_config(tmp_path, port)), "-c", "test:///default")
        assert daemon.proc.wait(15) == 1
        assert f"metrics endpoint 127.0.0.1 port {port}: Address already in use" in daemon.log()
    finally:
        taken.close()


def test_non_loopback_address_refused(tmp_path: Path, spawn: Callable[..., Vhostmd]) -> None:
    """Without allow_remote="yes" a non-loopback address is a config error with file:line."""
    config = endpoint_config(tmp_path, 0)
    config.write_text(config.read_text().replace('address="127.0.0.1"', 'address="0.0.0.0"'))
    daemon = spawn("-d", "-f", str(config), "-c", "test:///default")
    assert daemon.proc.wait(15) == 1
    line = next(n for n, text in enumerate(config.read_text().splitlines(), 1)
                if "metrics_endpoint" in text)
    assert f"{config}:{line}: metrics_endpoint address 0.0.0.0 is not a loopback address" in (
        daemon.log()
    )
