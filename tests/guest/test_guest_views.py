"""vm-dump-metrics --format json|openmetrics and --watch: real disks, real processes, real tmux."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
from helpers.wiredisk import DiskWriter, write_disk
from vhostmd_guest.document import parse_document
from vhostmd_guest.reader import DiskSource, MetricsReader
from vhostmd_guest.views import to_dict, to_openmetrics, typed_values
from vhostmd_wire import openmetrics, protocol

UUID1 = "4a1c1b1e-0000-4000-8000-000000000001"
UUID2 = "4a1c1b1e-0000-4000-8000-000000000002"

DOC = protocol.document(
    b'<metric type="uint32" context="host"><name>TotalPhyCPUs</name><value>8</value></metric>\n',
    b'<metric type="string" context="host"><name>HostName</name>'
    b"<value>a\\b &quot;q&quot;&#10;line2</value></metric>\n",
    b'<metric type="uint64" context="host" unit="MiB"><name>TotalPhyMem</name>'
    b"<value>18446744073709551615</value></metric>\n",
    b'<metric type="real64" context="host" unit="s"><name>PublicationTime</name>'
    b"<value>1700000000.125</value></metric>\n",
    b'<metric type="uint32" context="host" unit="s"><name>UpdatePeriod</name>'
    b"<value>5</value></metric>\n",
    b'<metric type="string" context="host"><name>HostIdentity</name>'
    b"<value>0123456789abcdef0123456789abcdef</value></metric>\n",
    b'<metric type="real32" context="host"><name>Load</name><value>0.1</value></metric>\n',
    b'<metric type="real64" context="host"><name>Odd</name><value>nan</value></metric>\n',
    b'<metric type="int32" context="host"><name>Bad</name><value>12x</value></metric>\n',
    b'<metric type="int64" context="vm" id="3" uuid="' + UUID1.encode() + b'" unit="k">'
    b"<name>PageRates</name><value>-9007199254740993</value></metric>\n",
    b'<metric type="real64" context="vm" id="3" uuid="' + UUID1.encode() + b'" unit="s">'
    b"<name>TotalCPUTime</name><value>123.456</value></metric>\n",
    b'<metric type="real64" context="vm" id="4" uuid="' + UUID2.encode() + b'" unit="s">'
    b"<name>TotalCPUTime</name><value>1e300</value></metric>\n",
)


def _tool() -> List[str]:
    script = Path(sys.executable).parent / "vm-dump-metrics"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vhostmd_guest"]


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*_tool(), *args], capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def test_names_and_escaping() -> None:
    """The mapping the host's endpoint shares (vhostmd_wire.openmetrics)."""
    assert openmetrics.snake_case("TotalCPUTime") == "total_cpu_time"
    assert openmetrics.snake_case("TotalPhyCPUs") == "total_phy_cpus"
    assert openmetrics.snake_case("Page-Rate 2") == "page_rate_2"
    assert openmetrics.family_name("vm", "TotalCPUTime", "s", "real64") == (
        "vhostmd_vm_total_cpu_time_seconds"
    )
    assert openmetrics.family_name("host", "TotalPhyMem", "MiB", "uint64") == (
        "vhostmd_host_total_phy_mem_bytes"
    )
    # upstream's ambiguous "k" is kept as it is, never scaled
    assert openmetrics.family_name("host", "PageRates", "k", "int64") == "vhostmd_host_page_rates_k"
    assert openmetrics.scale_value(3, "k") == 3
    assert openmetrics.family_name("host", "UptimeSeconds", "s", "real64") == (
        "vhostmd_host_uptime_seconds"
    )
    assert openmetrics.family_name("host", "PagesTotal", None, "uint64") == (
        "vhostmd_host_pages_total_value"
    )
    assert openmetrics.escape_label_value('a\\b "q"\nc') == 'a\\\\b \\"q\\"\\nc'
    assert openmetrics.scale_value(3, "MiB") == 3 << 20
    assert openmetrics.format_value(2**64 - 1) == "18446744073709551615"
    assert openmetrics.format_value(math.inf) == "+Inf"


def test_json_round_trips_the_typed_values(tmp_path: Path) -> None:
    """--format json parses and gives back every value, with its Python type, as the library."""
    disk = tmp_path / "vhostmd0"
    write_disk(disk, DOC)
    proc = run("--disk", str(disk), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # strict: no NaN literal is accepted below either
    json.loads(proc.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    got = typed_values(data)
    reader = MetricsReader(DiskSource(path=str(disk)))
    expected = {}
    for m in reader.read():
        try:
            value = m.value
        except Exception:
            value = None
        expected.setdefault((m.context.context_name, m.vm_uuid, m.name), value)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[key]), key  # type: ignore[arg-type]
        else:
            assert got[key] == value and type(got[key]) is type(value), key
    assert got[("host", None, "TotalPhyMem")] == 2**64 - 1  # beyond 2**53, exact
    assert got[("vm", UUID1, "PageRates")] == -9007199254740993
    assert data["host"]["Bad"]["value"] is None and "12x" in data["host"]["Bad"]["error"]
    assert [vm["id"] for vm in data["vms"]] == [3, 4]
    assert data["identity"] == "0123456789abcdef0123456789abcdef"
    assert data["update_period"] == 5 and data["publication_time"] == 1700000000.125
    assert data["stale"] is True and data["age"] > 1000  # published in 2023


def test_dict_freshness_fields() -> None:
    doc = parse_document(DOC)
    data = to_dict(doc, now=1700000003.0)
    assert (data["age"], data["stale"]) == (2.875, False)
    assert to_dict(doc, now=1700000010.2)["stale"] is True
    upstream = parse_document(protocol.document(b""))
    assert {k: to_dict(upstream)[k] for k in ("age", "stale", "identity")} == dict.fromkeys(
        ("age", "stale", "identity")
    )


def test_openmetrics_parses_with_prometheus_client(tmp_path: Path) -> None:
    """--format openmetrics is accepted by prometheus_client's strict OpenMetrics parser."""
    parser = pytest.importorskip("prometheus_client.openmetrics.parser")
    disk = tmp_path / "vhostmd0"
    write_disk(disk, DOC)
    proc = run("--disk", str(disk), "--format", "openmetrics")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode()
    assert text.endswith("# EOF\n")
    assert text == to_openmetrics(parse_document(DOC))
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert families["vhostmd_host_total_phy_cpus"].type == "gauge"
    mem = families["vhostmd_host_total_phy_mem_bytes"]
    assert mem.unit == "bytes" and mem.samples[0].value == (2**64 - 1) << 20  # exact
    cpu = families["vhostmd_vm_total_cpu_time_seconds"]
    assert [(s.labels, s.value) for s in cpu.samples] == [
        ({"vm_uuid": UUID1, "vm_id": "3"}, 123.456),
        ({"vm_uuid": UUID2, "vm_id": "4"}, 1e300),
    ]
    name = families["vhostmd_host_name"]  # HostName: the context word is not repeated
    assert name.type == "info"
    assert name.samples[0].labels == {"value": 'a\\b "q"\nline2'}
    assert families["vhostmd_host_publication_time_seconds"].samples[0].value == 1700000000.125
    assert math.isnan(families["vhostmd_host_odd"].samples[0].value)
    assert "vhostmd_host_bad" not in families  # 12x is no int32: no sample


def test_bad_format_and_watch_values_are_usage_errors(tmp_path: Path) -> None:
    for args in (
        ["--format", "yaml"],
        ["--watch", "0"],
        ["--watch", "x"],
        ["--watch", "1", "--format", "json"],
        ["--watch", "1", "-d", str(tmp_path / "out")],
    ):
        proc = run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert b"Usage:" in proc.stderr


def test_xml_stays_the_default_and_byte_identical(tmp_path: Path) -> None:
    disk = tmp_path / "vhostmd0"
    write_disk(disk, DOC)
    assert run("--disk", str(disk)).stdout == DOC
    assert run("--disk", str(disk), "--format", "xml").stdout == DOC


@pytest.mark.slow
def test_watch_without_a_tty_prints_frames_and_shows_errors(tmp_path: Path) -> None:
    """Frames separated by a blank line, no ANSI; a corrupt disk is shown and the watch goes on."""
    disk = tmp_path / "vhostmd0"
    with DiskWriter.create(disk) as writer:
        writer.publish(DOC)
        proc = subprocess.Popen(
            [*_tool(), "--disk", str(disk), "--watch", "0.2", "--busy-timeout", "0.3"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)
            with open(disk, "r+b") as f:  # a checksum that does not match the content
                f.seek(8)
                f.write(b"\x7f\x7f\x7f\x7f")
            time.sleep(2.5)
        finally:
            proc.send_signal(2)  # SIGINT, as Ctrl-C
            out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    text = out.decode()
    assert "\x1b[" not in text
    frames = text.split("\n\n")
    assert len(frames) >= 3
    assert frames[0].startswith("vhostmd metrics at ")
    assert "TotalPhyCPUs" in frames[0] and "STALE" in frames[0]
    assert "checksum" in frames[-1] and "error:" in frames[-1]
    assert "TotalPhyCPUs" in frames[-1]  # the last good document stays shown


@pytest.fixture
def tmux(tmp_path: Path):  # type: ignore[no-untyped-def]
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (scripts/setup-env installs it)")
    sock = str(tmp_path / "tmux.sock")  # a private server: no other session is touched

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-S", sock, *args],
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "TERM": "xterm"},
        )

    yield call
    call("kill-server")


def _wait_for(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_watch_in_a_real_terminal(tmp_path: Path, tmux) -> None:  # type: ignore[no-untyped-def]
    """tmux runs --watch 1; a new value written to the disk appears; C-c exits 0."""
    disk = tmp_path / "vhostmd0"
    status = tmp_path / "status"
    tool = " ".join(_tool())
    with DiskWriter.create(disk) as writer:
        writer.publish(DOC.replace(b"<value>8</value>", b"<value>1111</value>"))
        command = f"{tool} --disk {disk} --watch 1; echo $? > {status}"
        started = tmux("new-session", "-d", "-x", "120", "-y", "40", command)
        assert started.returncode == 0, started.stderr

        def screen() -> str:
            return tmux("capture-pane", "-p").stdout

        assert _wait_for(lambda: "1111" in screen()), screen()
        assert "TotalPhyCPUs" in screen() and "NAME" in screen()
        writer.publish(DOC.replace(b"<value>8</value>", b"<value>2222</value>"))
        assert _wait_for(lambda: "2222" in screen()), screen()
        assert "1111" not in screen()  # the screen was cleared, not appended to
        tmux("send-keys", "C-c")
        assert _wait_for(status.exists), screen()
    assert _wait_for(lambda: status.read_text().strip() != "")
    assert status.read_text().strip() == "0"


def test_watch_table_fits_the_width_and_never_cuts_a_value() -> None:
    """Long names are shortened in the middle; a value too wide goes whole on lines below."""
    from vhostmd_guest.views import render_table

    long_value = "x" * 150 + "END"
    long_name = "AVeryLongMetricNameThatGoesOnAndOn.device-sda"
    doc = parse_document(protocol.document(
        b'<metric type="string" context="host"><name>' + long_name.encode() + b"</name>"
        b"<value>" + b"v" * 50 + b"</value></metric>\n",
        b'<metric type="string" context="vm" id="7" uuid="' + UUID1.encode() + b'">'
        b"<name>Blob</name><value>" + long_value.encode() + b"</value></metric>\n",
    ))
    for width in (80, 60, 40):
        lines = render_table(doc, now=1700000000.0, width=width).splitlines()
        assert all(len(line) <= width for line in lines), (width, lines)
        body = "".join(line.strip() for line in lines)
        assert long_value in body and "v" * 50 in body, (width, lines)
        shortened = [ln for ln in lines if "~" in ln]
        assert not shortened or shortened[0].split()[0].endswith("sda"), lines
    at40 = render_table(doc, now=1700000000.0, width=40).splitlines()
    assert any(ln.strip().startswith("AVery") and "~" in ln for ln in at40), at40
    blob = at40.index("  Blob")
    assert "".join(ln.strip() for ln in at40[blob + 1:]) == long_value
