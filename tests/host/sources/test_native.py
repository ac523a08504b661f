"""Built-in sources: config syntax, /proc parsers, libvirt values checked independently.

libvirt's test driver (test:///default, and the golden node files) is the
hypervisor; every expected value is read independently through
libvirt-python, virsh or the files themselves. Faults use a thin subclass of
a real libvirt connection whose domains raise for one VM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from helpers import REPO
from lxml import etree

from vhostmd_py import config
from vhostmd_py.errors import ConfigError
from vhostmd_py.sources.base import PerDevice
from vhostmd_py.sources.builtin.catalogue import CATALOGUE, FIELDS, device_metric_name
from vhostmd_py.sources.builtin.hostproc import HostProc, parse_cpu_list, parse_os_release
from vhostmd_py.sources.builtin.source import NativeSource
from vhostmd_py.sources.vm import VM


def parse_config(data: bytes, file: str = "<config>") -> config.Config:
    """As the daemon parses: <source> fields checked against the built-in catalogue."""
    return config.parse_config(data, file=file, builtin_fields=CATALOGUE)


libvirt = pytest.importorskip("libvirt")

URI = "test:///default"

HEAD = """<?xml version="1.0" ?>
<!DOCTYPE vhostmd SYSTEM "vhostmd.dtd">
<vhostmd>
  <globals>
    <disk><name>d</name><path>/dev/shm/x</path><size unit="k">256</size></disk>
    <update_period>5</update_period><path>/bin</path><transport>vbd</transport>
  </globals>
  <metrics>
"""


def _conf(metrics: str) -> bytes:
    """A config document with METRICS inside <metrics>."""
    return (HEAD + metrics + "  </metrics>\n</vhostmd>\n").encode()


def _nodes() -> Path:
    """The golden node files (node-N.xml with N test-driver domains)."""
    from conftest import golden_root

    return golden_root() / "upstream" / "nodes"


# --- config syntax -----------------------------------------------------------


def test_source_parses_and_mixes_with_actions() -> None:
    """<source> and <action> metrics mix in one config; the source field is kept."""
    cfg = parse_config(_conf(
        '<metric type="real64" context="vm" unit="s"><name>T</name><source>vm.cpu_time</source>'
        "</metric>\n"
        '<metric type="string" context="host"><name>A</name><action>echo a</action></metric>\n'
    ))
    assert [(m.name, m.source, m.action) for m in cfg.metrics] == [
        ("T", "vm.cpu_time", ""),
        ("A", None, "echo a"),
    ]


def test_unknown_field_names_file_line_and_field() -> None:
    """An unknown field is a ConfigError with file, line and the known names."""
    with pytest.raises(ConfigError) as err:
        parse_config(_conf(
            '<metric type="uint64" context="vm">\n<name>X</name>\n<source>vm.nosuch</source>'
            "</metric>\n"
        ), file="my.conf")
    assert err.value.file == "my.conf"
    assert err.value.line == HEAD.count("\n") + 3
    assert "unknown built-in source field 'vm.nosuch'" in err.value.reason
    assert "vm.cpu_time" in err.value.reason


@pytest.mark.parametrize(
    "metric, words",
    [
        ('<metric type="uint64" context="host"><name>X</name><source>vm.vcpus</source></metric>',
         "context 'vm'"),
        ('<metric type="uint64" context="host"><name>X</name><source>host.vendor</source>'
         "</metric>", "string values"),
        ('<metric type="group" context="host"><name>X</name><source>host.page_rates</source>'
         '<variable name="a" type="uint64"/><variable name="b" type="uint64"/>'
         '<variable name="c" type="uint64"/></metric>', "too many"),
    ],
)
def test_source_mismatch_refused(metric: str, words: str) -> None:
    """A field in the wrong context, type, or with too many group variables is refused."""
    with pytest.raises(ConfigError) as err:
        parse_config(_conf(metric))
    assert words in err.value.reason


def test_upstream_dtd_refuses_source_ours_accepts(golden: Path) -> None:
    """<source> is our extension: upstream's DTD (unchanged) refuses it, ours accepts it."""
    doc = etree.fromstring(_conf(
        '<metric type="uint32" context="host"><name>N</name><source>host.cpus</source></metric>'
    ))
    upstream = etree.DTD(str(golden / "reference-configs" / "vhostmd.dtd"))
    ours = etree.DTD(str(REPO / "vhostmd.dtd"))
    assert not upstream.validate(doc)
    assert ours.validate(doc)
    assert (REPO / "vhostmd.dtd").read_bytes() == (
        REPO / "vhostmd_py" / "data" / "vhostmd.dtd"
    ).read_bytes()


def test_upstream_only_config_still_valid_against_upstream_dtd(golden: Path) -> None:
    """A shell-action config (the shipped example) validates against upstream's DTD."""
    upstream = etree.DTD(str(golden / "reference-configs" / "vhostmd.dtd"))
    doc = etree.parse(str(REPO / "conf" / "examples" / "vhostmd-shell.conf"))
    assert upstream.validate(doc), upstream.error_log


def test_catalogue_documented() -> None:
    """Every catalogue field appears in docs/METRICS.md and in the man page."""
    metrics_md = (REPO / "docs" / "METRICS.md").read_text()
    man = (REPO / "docs" / "man" / "vhostmd.conf.5").read_text()
    for field in FIELDS:
        assert f"`{field.name}`" in metrics_md, field.name
    assert "METRICS.md" in man and "<source>" in man.replace("\\", "")


def test_device_names() -> None:
    """Per-device names: {dev} substituted, else NAME.dev."""
    assert device_metric_name("{dev}_read", "vda") == "vda_read"
    assert device_metric_name("DiskReadBytes", "vda") == "DiskReadBytes.vda"


# --- /proc, /sys, os-release parsers on real trees -----------------------------


def test_hostproc_reads_copies_of_this_host(tmp_path: Path) -> None:
    """HostProc on a copy of /proc's files gives what the files say, parsed independently."""
    proc = tmp_path / "proc"
    proc.mkdir()
    for name in ("meminfo", "vmstat", "stat", "loadavg"):
        (proc / name).write_bytes(Path("/proc", name).read_bytes())
    cpu = tmp_path / "sys" / "devices" / "system" / "cpu"
    cpu.mkdir(parents=True)
    (cpu / "online").write_text("0-3,6,8-9\n")
    reader = HostProc(proc_root=proc, sys_root=tmp_path / "sys")
    mem = reader.meminfo()
    for line in (proc / "meminfo").read_text().splitlines():
        key, rest = line.split(":", 1)
        assert mem[key] == int(rest.split()[0])
    vmstat = reader.vmstat()
    assert vmstat == {a: int(b) for a, b in (ln.split() for ln in
                                             (proc / "vmstat").read_text().splitlines())}
    first = (proc / "stat").read_text().splitlines()[0].split()
    ticks = reader.cpu_ticks()
    assert [ticks["user"], ticks["nice"], ticks["system"]] == [int(x) for x in first[1:4]]
    assert reader.loadavg() == tuple(float(x) for x in
                                     (proc / "loadavg").read_text().split()[:3])
    assert reader.online_cpus() == 7
    assert parse_cpu_list("0") == 1


def test_hostproc_missing_files_give_nothing(tmp_path: Path) -> None:
    """Missing files are empty values, not errors."""
    reader = HostProc(proc_root=tmp_path, sys_root=tmp_path, os_release=tmp_path / "none")
    assert reader.meminfo() == {} and reader.vmstat() == {} and reader.cpu_ticks() == {}
    assert reader.loadavg() is None and reader.online_cpus() is None and reader.vendor() is None


def test_vendor_from_os_release(tmp_path: Path) -> None:
    """VENDOR_NAME wins over NAME; quotes are removed."""
    f = tmp_path / "os-release"
    f.write_text('NAME="Some Linux"\nVENDOR_NAME="Some Vendor, Inc."\n')
    assert HostProc(os_release=f).vendor() == "Some Vendor, Inc."
    f2 = tmp_path / "os-release2"
    f2.write_text("NAME='Plain'\n")
    assert HostProc(os_release=f2).vendor() == "Plain"
    assert parse_os_release('A="x \\"y\\""')["A"] == 'x "y"'


# --- libvirt values -------------------------------------------------------------


def _vms(conn: Any) -> List[VM]:
    """The running VMs as the daemon lists them."""
    from vhostmd_py.libvirt_host import Host
    from vhostmd_py.sources.vms import LibvirtVMs

    # The same test-driver instance as CONN (each open is its own).
    lister = LibvirtVMs(None, host=Host(None, read_only=conn))
    return lister.list_running()


def _collect(src: NativeSource, conf: bytes, vms: List[VM]) -> Dict[Tuple[str, str], bytes]:
    """One cycle of a native config: raw values by (uuid or 'host', metric name)."""
    cfg = parse_config(conf)
    requests = [(m, None) for m in cfg.host_metrics()]
    requests += [(m, vm) for vm in vms for m in cfg.vm_metrics()]
    values = asyncio.run(src.collect_many(requests))
    out: Dict[Tuple[str, str], bytes] = {}
    for (m, vm), v in zip(requests, values):
        key = "host" if vm is None else vm.uuid
        if isinstance(v, bytes):
            out[(key, m.name)] = v
        elif isinstance(v, PerDevice):  # PENDING (libvirt late) is no value either
            for dev, dv in v.values:
                out[(key, device_metric_name(m.name, dev))] = dv
    return out


ALL_VM = "".join(
    f'<metric type="{"real64" if f.kind == "real" else "uint64"}" context="vm">'
    f"<name>{f.name}</name><source>{f.name}</source></metric>\n"
    for f in FIELDS
    if f.context == "vm" and f.device is None
) + "".join(
    f'<metric type="uint64" context="vm"><name>{f.name}.{{dev}}</name><source>{f.name}</source>'
    "</metric>\n"
    for f in FIELDS
    if f.device is not None
)


def test_vm_values_equal_libvirt_per_domain_path() -> None:
    """Every VM field on test:///default equals libvirt-python's per-domain answers."""
    conn = libvirt.open(URI)
    src = NativeSource(connection=lambda: conn)
    vms = _vms(conn)
    got = _collect(src, _conf(ALL_VM), vms)
    for vm in vms:
        dom = conn.lookupByUUIDString(vm.uuid)
        info = dom.info()
        mem = dom.memoryStats()
        cpu = dom.getCPUStats(True)[0]
        u = vm.uuid
        # CPU time follows the clock on the test driver: read around it.
        assert abs(float(got[(u, "vm.cpu_time")]) - info[4] / 1e9) < 5
        assert int(got[(u, "vm.vcpus")]) == info[3] == dom.maxVcpus()
        assert int(got[(u, "vm.memory_max_kib")]) == info[1] == dom.maxMemory()
        assert int(got[(u, "vm.memory_max_mib")]) == info[1] // 1024
        assert int(got[(u, "vm.memory_kib")]) == info[2]
        assert int(got[(u, "vm.memory_mib")]) == info[2] // 1024
        assert int(got[(u, "vm.cpu_user_ns")]) == cpu["user_time"]
        for key in ("rss", "actual", "unused", "available", "swap_in", "major_fault"):
            assert int(got[(u, f"vm.balloon.{key}")]) == mem[key]
        xml = etree.fromstring(dom.XMLDesc(0).encode())
        disks = [t.get("dev") for t in xml.iterfind("devices/disk/target")]
        nics = [t.get("dev") for t in xml.iterfind("devices/interface/target")]
        assert disks and nics
        for d in disks:
            st = dom.blockStats(d)
            for i, f in enumerate(("rd_req", "rd_bytes", "wr_req", "wr_bytes", "errors")):
                # Counters follow the clock too: equal within the run's seconds.
                assert abs(int(got[(u, f"vm.disk.{f}.{d}")]) - st[i]) <= max(st[i] // 10**6, 5)
        for n in nics:
            st = dom.interfaceStats(n)
            names = ("rx_bytes", "rx_packets", "rx_errs", "rx_drop", "tx_bytes", "tx_packets",
                     "tx_errs", "tx_drop")
            for i, f in enumerate(names):
                assert abs(int(got[(u, f"vm.nic.{f}.{n}")]) - st[i]) <= max(st[i] // 10**6, 5)
        vcpus = dom.vcpus()[0]
        for n, _, t, _ in vcpus:
            assert abs(int(got[(u, f"vm.vcpu.time_ns.cpu{n}")]) - t) <= max(t // 10**6, 5)
    # The test driver answers the bulk call with state only: every group falls back.
    assert src.reader.bulk_groups and not any(src.reader.bulk_groups.values())
    conn.close()


def test_virsh_agrees_with_vm_cpu_time_format() -> None:
    """vm.cpu_time has virsh dominfo's digits (one decimal) and value, within the clock's drift."""
    conn = libvirt.open(URI)
    src = NativeSource(connection=lambda: conn)
    vms = _vms(conn)
    got = _collect(src, _conf(
        '<metric type="real64" context="vm"><name>T</name><source>vm.cpu_time</source></metric>'
    ), vms)
    out = subprocess.run(["virsh", "-c", URI, "dominfo", vms[0].uuid], capture_output=True,
                         text=True, env=dict(os.environ, LC_ALL="C"), check=True).stdout
    theirs = re.search(r"CPU time:\s+([0-9.]+)s", out)
    assert theirs is not None
    ours = got[(vms[0].uuid, "T")].decode()
    assert re.fullmatch(r"\d+\.\d", ours)
    assert abs(float(ours) - float(theirs.group(1))) < 5
    conn.close()


def test_host_values_equal_libvirt_and_proc() -> None:
    """Host libvirt fields equal libvirt-python's; /proc fields lie between two readings."""
    conn = libvirt.open(URI)
    src = NativeSource(connection=lambda: conn)
    fields = ["host.hostname", "host.hypervisor_version", "host.libvirt_api", "host.cpus",
              "host.memory_mib", "host.nodename", "host.nodename_short", "host.mem_free_mib",
              "host.pgpgin"]
    conf = _conf("".join(
        f'<metric type="string" context="host"><name>{f}</name><source>{f}</source></metric>\n'
        for f in fields
    ))
    before = int(Path("/proc/vmstat").read_text().split("pgpgin ")[1].split()[0])
    got = {k[1]: v.decode() for k, v in _collect(src, conf, []).items()}
    after = int(Path("/proc/vmstat").read_text().split("pgpgin ")[1].split()[0])
    v = conn.getVersion()
    lv = conn.getLibVersion()
    assert got["host.hostname"] == conn.getHostname()
    assert got["host.hypervisor_version"] == (
        f"{conn.getType()} {v // 1000000}.{v // 1000 % 1000}.{v % 1000}"
    )
    assert got["host.libvirt_api"] == (
        f"{conn.getType()} {lv // 1000000}.{lv // 1000 % 1000}.{lv % 1000}"
    )
    assert int(got["host.cpus"]) == conn.getInfo()[2]
    assert int(got["host.memory_mib"]) == conn.getInfo()[1]
    assert got["host.nodename"] == os.uname().nodename
    assert got["host.nodename_short"] == os.uname().nodename.split(".")[0]
    assert before <= int(got["host.pgpgin"]) <= after
    conn.close()


def test_node_file_values_and_order() -> None:
    """node-100.xml: the SAP VM fields of every domain equal dom.info()."""
    conn = libvirt.open(f"test://{_nodes() / 'node-100.xml'}")
    src = NativeSource(connection=lambda: conn)
    vms = _vms(conn)
    assert len(vms) == 100
    conf = (REPO / "conf" / "sap-vhostmd.conf").read_bytes()
    got = _collect(src, conf, vms)
    for vm in vms:
        info = conn.lookupByUUIDString(vm.uuid).info()
        assert int(got[(vm.uuid, "ResourceProcessorLimit")]) == info[3]
        assert int(got[(vm.uuid, "ResourceMemoryLimit")]) == info[1] // 1024
        assert int(got[(vm.uuid, "PhysicalMemoryAllocatedToVirtualSystem")]) == info[2] // 1024
        assert abs(float(got[(vm.uuid, "TotalCPUTime")]) - info[4] / 1e9) < 5
    conn.close()


# --- faults -----------------------------------------------------------------------


class _FailingDomain(libvirt.virDomain):  # type: ignore[misc]
    """A real domain whose per-domain info call fails, as a dying QEMU's would."""

    def info(self) -> Any:
        raise libvirt.libvirtError("injected: domain info failed")

    def __del__(self) -> None:
        pass  # the original domain object owns (and frees) the C pointer


class _OneFailingConn(libvirt.virConnect):  # type: ignore[misc]
    """A real connection that hands out one failing domain (by name)."""

    def __init__(self, conn: Any, bad: str) -> None:
        super().__init__(_obj=conn._o)
        self.bad = bad
        self._originals: List[Any] = []  # own the C pointers the wrappers share

    def __del__(self) -> None:
        pass  # the wrapped connection closes itself

    def _wrap(self, dom: Any) -> Any:
        if dom.name() != self.bad:
            return dom
        self._originals.append(dom)
        return _FailingDomain(self, _obj=dom._o)

    def listAllDomains(self, flags: int = 0) -> Any:
        return [self._wrap(d) for d in super().listAllDomains(flags)]

    def getAllDomainStats(self, stats: int = 0, flags: int = 0) -> Any:
        return [(self._wrap(d), r) for d, r in super().getAllDomainStats(stats, flags)]


def test_one_failing_vm_leaves_only_its_metrics_out(caplog: pytest.LogCaptureFixture) -> None:
    """info() failing for one VM: its metrics are left out (logged once), the others published."""
    base = libvirt.open(f"test://{_nodes() / 'node-10.xml'}")
    vms = _vms(base)
    bad = vms[3]
    conn = _OneFailingConn(base, bad.name)
    src = NativeSource(connection=lambda: conn)
    conf = _conf('<metric type="uint32" context="vm"><name>C</name><source>vm.vcpus</source>'
                 "</metric>")
    with caplog.at_level(logging.WARNING):
        got = _collect(src, conf, vms)
        got2 = _collect(src, conf, vms)
    assert set(got) == set(got2) == {(vm.uuid, "C") for vm in vms if vm is not bad}
    failures = [r for r in caplog.records if "injected" in r.getMessage()]
    assert len(failures) == 1  # once per VM and call, not every cycle
    left_out = [r for r in caplog.records if "left out: built-in source vm.vcpus" in r.getMessage()]
    assert len(left_out) == 1
    base.close()


def test_vanished_domain_left_out() -> None:
    """A VM that stopped after the listing has no values; the others have theirs."""
    conn = libvirt.open(f"test://{_nodes() / 'node-10.xml'}")
    vms = _vms(conn)
    conn.lookupByUUIDString(vms[0].uuid).destroy()
    src = NativeSource(connection=lambda: conn)
    got = _collect(src, _conf(
        '<metric type="uint32" context="vm"><name>C</name><source>vm.vcpus</source></metric>'
    ), vms)
    assert set(got) == {(vm.uuid, "C") for vm in vms[1:]}
    conn.close()


def test_libvirt_gone_keeps_host_proc_metrics() -> None:
    """No connection: libvirt fields left out, /proc fields still there."""
    src = NativeSource(connection=lambda: None)
    got = _collect(src, _conf(
        '<metric type="uint32" context="host"><name>C</name><source>host.cpus</source></metric>'
        '<metric type="uint64" context="host"><name>F</name><source>host.mem_free_mib</source>'
        "</metric>"
    ), [])
    assert set(got) == {("host", "F")}


def test_slow_libvirt_is_bounded() -> None:
    """A libvirt read slower than the timeout is abandoned; host /proc values still come."""
    import threading

    gate = threading.Event()

    def stuck() -> Any:
        gate.wait(10)
        return None

    from vhostmd_py.libvirt_host import BlockingWorker

    # The daemon's worker (a daemon thread): asyncio.run does not wait for it.
    src = NativeSource(connection=stuck, run_blocking=BlockingWorker().call, timeout=0.2)
    conf = _conf(
        '<metric type="uint32" context="host"><name>C</name><source>host.cpus</source></metric>'
        '<metric type="uint64" context="host"><name>F</name><source>host.mem_free_mib</source>'
        "</metric>"
    )
    import time

    t0 = time.monotonic()
    got = _collect(src, conf, [])
    assert time.monotonic() - t0 < 2
    gate.set()
    assert set(got) == {("host", "F")}


def test_rates_first_cycle_over_one_second_then_since_previous(tmp_path: Path) -> None:
    """Page rates: the first cycle samples twice one second apart, later cycles use the last one."""
    proc = tmp_path / "proc"
    proc.mkdir()
    now = [100.0]
    vm = proc / "vmstat"

    def write(pgpgin: int, pgfault: int) -> None:
        vm.write_text(f"pgpgin {pgpgin}\npgfault {pgfault}\n")

    async def sleep(seconds: float) -> None:
        now[0] += seconds
        write(1100, 2500)  # what the kernel counted meanwhile

    write(1000, 2000)
    src = NativeSource(proc_root=proc, clock=lambda: now[0], sleep=sleep)
    conf = _conf('<metric type="group" context="host"><name>R</name>'
                 "<source>host.page_rates</source>"
                 '<variable name="I" type="uint64"/><variable name="F" type="uint64"/></metric>')
    assert _collect(src, conf, [])[("host", "R")] == b"100,500"
    now[0] += 4.0
    write(1500, 4500)
    assert _collect(src, conf, [])[("host", "R")] == b"100,500"


# --- the daemon: SAP profile on 1000 domains, no process -------------------------------


@pytest.mark.slow
def test_sap_dump_node_1000_no_execve(tmp_path: Path) -> None:
    """vhostmd --dump of conf/sap-vhostmd.conf on node-1000: no execve after start-up; values."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace not installed (scripts/setup-env installs it)")
    node = _nodes() / "node-1000.xml"
    trace = tmp_path / "trace"
    proc = subprocess.run(
        [strace, "-f", "-qq", "-e", "trace=execve", "-o", str(trace), sys.executable, "-m",
         "vhostmd_py.cli", "--dump", "-f", str(REPO / "conf" / "sap-vhostmd.conf"),
         "-c", f"test://{node}"],
        capture_output=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    execs = [ln for ln in trace.read_text().splitlines() if "execve(" in ln]
    # Only the interpreter's own start (the strace'd command itself).
    assert len(execs) == 1, execs
    assert sys.executable in execs[0] or "python" in execs[0]
    root = etree.fromstring(proc.stdout)
    conn = libvirt.open(f"test://{node}")
    by_uuid: Dict[str, Dict[str, str]] = {}
    for m in root.findall("metric"):
        if m.get("context") == "vm":
            by_uuid.setdefault(m.get("uuid") or "", {})[m.findtext("name") or ""] = (
                m.findtext("value") or ""
            )
    assert len(by_uuid) == 1000
    for uuid, metrics in by_uuid.items():
        info = conn.lookupByUUIDString(uuid).info()
        assert set(metrics) == {"TotalCPUTime", "ResourceProcessorLimit", "ResourceMemoryLimit",
                                "PhysicalMemoryAllocatedToVirtualSystem"}
        assert int(metrics["ResourceProcessorLimit"]) == info[3]
        assert int(metrics["ResourceMemoryLimit"]) == info[1] // 1024
        assert int(metrics["PhysicalMemoryAllocatedToVirtualSystem"]) == info[2] // 1024
        assert abs(float(metrics["TotalCPUTime"]) - info[4] / 1e9) < 30
    conn.close()
