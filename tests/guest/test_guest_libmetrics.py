"""Tests of vhostmd_guest.libmetrics: upstream's API, typed, without upstream's bugs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import tty
from pathlib import Path
from typing import Iterator

import pytest
from helpers.wiredisk import DiskWriter
from vhostmd_guest import libmetrics
from vhostmd_guest.errors import DestinationError, MetricValueError, VmIdentityError
from vhostmd_guest.libmetrics import (
    M_INT32,
    M_STRING,
    METRIC_CONTEXT_HOST,
    METRIC_CONTEXT_VM,
    HostCpuMetrics,
    HostMemoryMetrics,
    VmCpuMetrics,
    VmMemoryMetrics,
)
from vhostmd_guest.reader import DiskSource, MetricsReader, VirtioSource

VM_A = "11111111-2222-4333-8444-555555555555"
VM_B = "66666666-2222-4333-8444-555555555555"


def _metric(name: str, type_: str, value: str, ctx: str = "host", uuid: str = "") -> str:
    attrs = f" id='{1 if uuid == VM_A else 2}' uuid='{uuid}'" if ctx == "vm" else ""
    return (
        f"  <metric type='{type_}' context='{ctx}'{attrs}>\n"
        f"    <name>{name}</name>\n    <value>{value}\n</value>\n  </metric>\n"
    )


def _vm_block(uuid: str, base: int) -> str:
    return "".join(
        [
            _metric("TotalPhyMem", "uint64", str(base + 1), "vm", uuid),
            _metric("UsedMem", "uint64", str(base + 2), "vm", uuid),
            _metric("FreeMem", "uint64", str(base + 3), "vm", uuid),
            _metric("PagedOutMemory", "uint64", str(base + 4), "vm", uuid),
            _metric("PagedInMemory", "uint64", str(base + 5), "vm", uuid),
            _metric("PageInRate", "uint64", str(base + 6), "vm", uuid),
            _metric("PageFaultRate", "uint64", str(base + 7), "vm", uuid),
            _metric("NumCPUs", "uint32", str(base + 8), "vm", uuid),
            _metric("TotalCPUTime", "real64", f"{base}.75", "vm", uuid),
        ]
    )


DOC = (
    "<metrics>\n"
    + _metric("TotalPhyCPUs", "uint32", "8")
    + _metric("NumCPUs", "uint32", "6")
    + _metric("TotalCPUTime", "real64", "12345.5")
    + _metric("TotalPhyMem", "uint64", "1000")
    + _metric("UsedMem", "uint64", "600")
    + _metric("FreeMem", "uint64", "400")
    + _metric("PagedInMemory", "uint64", "11")
    + _metric("PagedOutMemory", "uint64", "12")
    + _metric("PageInRate", "uint64", "13")
    + _metric("PageFaultRate", "uint64", "14")
    + _metric("HostName", "string", "node-1")
    + _vm_block(VM_A, 100)
    + _vm_block(VM_B, 200)
    + "</metrics>\n"
).encode()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A metrics disk published by the host writer, holding two VMs."""
    path = tmp_path / "vhostmd0"
    d = DiskWriter.create(path, 65536)
    d.publish(DOC)
    d.close()
    yield path
    libmetrics.set_default_reader(None)


def test_constants_match_upstream_header() -> None:
    """M_* and METRIC_CONTEXT_* have upstream's enum values."""
    assert (M_INT32, M_STRING) == (0, 6)
    assert (METRIC_CONTEXT_HOST, METRIC_CONTEXT_VM) == (0, 1)


def test_get_metric_first_call_in_fresh_process(disk: Path) -> None:
    """In a fresh process the very first get_metric succeeds (upstream's fails)."""
    code = (
        "from vhostmd_guest import libmetrics as lm\n"
        "from vhostmd_guest.reader import MetricsReader, DiskSource\n"
        f"lm.set_default_reader(MetricsReader(DiskSource(path={str(disk)!r})))\n"
        "m = lm.get_metric('TotalPhyCPUs', lm.METRIC_CONTEXT_HOST)\n"
        "print(m.type.name, repr(m.value))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "UINT32 8"


def test_get_metric_typed_values(disk: Path) -> None:
    """Values come back as int, float or str by type; string keeps no trailing newline."""
    libmetrics.set_default_reader(MetricsReader(DiskSource(path=str(disk)), vm_uuid=VM_B))
    assert libmetrics.get_metric("HostName").value == "node-1"
    assert libmetrics.get_metric("TotalCPUTime").value == 12345.5
    vm = libmetrics.get_metric("TotalCPUTime", METRIC_CONTEXT_VM)
    assert vm.value == 200.75
    assert vm.vm_uuid == VM_B


def test_host_records(disk: Path) -> None:
    """Host CPU and memory records are filled from the host metrics."""
    reader = MetricsReader(DiskSource(path=str(disk)))
    assert libmetrics.get_host_cpu_metrics(reader=reader) == HostCpuMetrics(8, 6, 12345.5)
    assert libmetrics.get_host_memory_metrics(reader=reader) == HostMemoryMetrics(
        total_physical_memory=1000,
        used_physical_memory=600,
        free_physical_memory=400,
        paged_out_memory=12,
        paged_in_memory=11,
        page_in_rate=13,
        page_fault_rate=14,
    )


@pytest.mark.parametrize(("uuid", "base"), [(VM_A, 100), (VM_B, 200)])
def test_vm_records_use_the_right_metrics(disk: Path, uuid: str, base: int) -> None:
    """Each VM record field comes from its own metric; CPU time stays real64."""
    reader = MetricsReader(DiskSource(path=str(disk)), vm_uuid=uuid)
    # Upstream: total <- FreeMem, paged_out <- PageFaultRate, paged_in <-
    # PageInRate, and TotalCPUTime read through a uint32 (fraction lost).
    assert libmetrics.get_vm_memory_metrics(reader=reader) == VmMemoryMetrics(
        total_physical_memory=base + 1,
        used_physical_memory=base + 2,
        free_physical_memory=base + 3,
        paged_out_memory=base + 4,
        paged_in_memory=base + 5,
        page_in_rate=base + 6,
        page_fault_rate=base + 7,
    )
    cpu = libmetrics.get_vm_cpu_metrics(reader=reader)
    assert cpu == VmCpuMetrics(total_phys_cpus=None, num_phys_cpus_utilized=base + 8,
                               total_cpu_time=base + 0.75)  # fmt: skip
    assert isinstance(cpu.total_cpu_time, float)


def test_vm_records_need_this_vms_uuid(disk: Path, tmp_path: Path) -> None:
    """With two VMs and no UUID anywhere, vm records fail with VmIdentityError."""
    reader = MetricsReader(DiskSource(path=str(disk)), sys_root=tmp_path / "nosys")
    with pytest.raises(VmIdentityError):
        libmetrics.get_vm_cpu_metrics(reader=reader)


def test_absent_metrics_leave_fields_none(tmp_path: Path) -> None:
    """A record field whose metric is missing is None; a wrongly typed one is an error."""
    path = tmp_path / "d"
    d = DiskWriter.create(path, 4096)
    d.publish(b"<metrics>\n" + _metric("NumCPUs", "string", "many").encode() + b"</metrics>\n")
    d.close()
    reader = MetricsReader(DiskSource(path=str(path)))
    assert libmetrics.get_host_memory_metrics(reader=reader) == HostMemoryMetrics()
    with pytest.raises(MetricValueError, match="integer type is expected"):
        libmetrics.get_host_cpu_metrics(reader=reader)


def test_dump_metrics_to_file_and_failure(disk: Path, tmp_path: Path) -> None:
    """dump_metrics writes the content bytes; an unwritable dest is DestinationError."""
    out = tmp_path / "out.xml"
    data = libmetrics.dump_metrics(out, source=DiskSource(path=str(disk)))
    assert data == DOC
    assert out.read_bytes() == DOC
    with pytest.raises(DestinationError) as info:
        libmetrics.dump_metrics(tmp_path / "missing" / "x.xml", source=DiskSource(path=str(disk)))
    assert info.value.errno is not None


def test_dump_virtio_metrics_and_reader_over_virtio(tmp_path: Path) -> None:
    """dump_virtio_metrics and a VirtioSource reader talk to a real pty 'port'."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    reply = b"<metrics>\n" + _vm_block(VM_A, 100).encode() + b"</metrics>\n\n"

    def host(times: int) -> None:
        for _ in range(times):
            got = b""
            while not got.endswith(b"\n\n"):
                got += os.read(master, 64)
            os.write(master, reply)

    t = threading.Thread(target=host, args=(3,), daemon=True)
    t.start()
    try:
        port = os.ttyname(slave)
        out = tmp_path / "v.xml"
        assert libmetrics.dump_virtio_metrics(out, source=VirtioSource(port=port)) == reply
        assert out.read_bytes() == reply
        reader = MetricsReader(VirtioSource(port=port), sys_root=tmp_path / "nosys")
        # One VM in a virtio reply: no UUID needed.
        assert libmetrics.get_vm_cpu_metrics(reader=reader).total_cpu_time == 100.75
        assert reader.get("UsedMem", METRIC_CONTEXT_VM).value == 102
        assert reader.parses == 1  # same reply twice: parsed once
        t.join(5)
    finally:
        os.close(master)
        os.close(slave)


def test_default_reader_is_lazy() -> None:
    """Importing and creating the default reader does no I/O."""
    libmetrics.set_default_reader(None)
    reader = libmetrics.default_reader()
    assert reader is libmetrics.default_reader()
    assert reader.parses == 0
    libmetrics.set_default_reader(None)
