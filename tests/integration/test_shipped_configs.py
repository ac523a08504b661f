"""The shipped configs (vhostmd.conf, conf/sap-vhostmd.conf) and the systemd unit.

The shipped configs use built-in sources only; their shell-action twins in
conf/examples/ are tested the same way (same names, types, units, values).

Each config is loaded by our parser, compared with the reference it is
derived from (metric names, types, contexts), and run for real: one
`vhostmd --dump` cycle against libvirt's test driver, every value checked
against an independent reading of /proc or of libvirt-python taken around
the run. The unit is checked by systemd-analyze and by running the daemon
exactly as its ExecStart/ExecReload/stop do.
"""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
from lxml import etree

from vhostmd_py.config import Config
from vhostmd_py.process.life import load_config  # as the daemon loads: with the catalogue

pytestmark = pytest.mark.integration

libvirt = pytest.importorskip("libvirt")
Conn = Any  # libvirt.virConnect (libvirt-python ships no type information)

URI = "test:///default"
MIB = 1024 * 1024
# Memory moves while the suite runs; a unit or field mix-up is off by far more
# (KiB vs MiB: x1024; MemFree vs MemAvailable here: about 900 MiB).
MEM_SLACK_MIB = 256

SAP_HOST = {
    "HostName": "string",
    "HostSystemInfo": "string",
    "VirtualizationVendor": "string",
    "VirtProductInfo": "string",
    "Time": "uint64",
    "NumberOfPhysicalCPUs": "uint32",
    "TotalCPUTime": "real64",
    "FreePhysicalMemory": "uint64",
    "FreeVirtualMemory": "uint64",
    "MemoryAllocatedToVirtualServers": "uint64",
    "UsedVirtualMemory": "uint64",
    "PagedInMemory": "uint64",
    "PagedOutMemory": "uint64",
}
SAP_VM = {
    "TotalCPUTime": "real64",
    "ResourceProcessorLimit": "uint32",
    "ResourceMemoryLimit": "uint64",
    "PhysicalMemoryAllocatedToVirtualSystem": "uint64",
}
SAP_MIB = {
    "FreePhysicalMemory",
    "FreeVirtualMemory",
    "MemoryAllocatedToVirtualServers",
    "UsedVirtualMemory",
    "PagedInMemory",
    "PagedOutMemory",
    "ResourceMemoryLimit",
    "PhysicalMemoryAllocatedToVirtualSystem",
}


@dataclass(frozen=True)
class Reading:
    """An independent snapshot of what the actions read."""

    t: float
    meminfo: Dict[str, int]  # KiB
    vmstat: Dict[str, int]
    cpu_ticks: int  # user + nice + system, all CPUs
    dom: Tuple[int, int, int, int, int]  # libvirt dom.info() of the test domain


def _read(conn: Conn) -> Reading:
    """Read /proc and libvirt once."""
    meminfo = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, rest = line.split(":", 1)
        meminfo[key] = int(rest.split()[0])
    vmstat = {
        k: int(v) for k, v in (ln.split() for ln in Path("/proc/vmstat").read_text().splitlines())
    }
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()
    assert cpu[0] == "cpu"
    dom = conn.lookupByName("test").info()
    return Reading(
        time.time(), meminfo, vmstat, int(cpu[1]) + int(cpu[2]) + int(cpu[3]), tuple(dom)
    )


def _dump(conf: Path) -> Tuple[Dict[Tuple[str, str], Dict[str, str | None]], str]:
    """Run one `vhostmd --dump` cycle; metrics by (context, name), and stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "vhostmd_py.cli", "--dump", "-f", str(conf), "-c", URI],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    root = etree.fromstring(proc.stdout, parser)
    out: Dict[Tuple[str, str], Dict[str, str | None]] = {}
    for m in root.findall("metric"):
        key = (m.get("context") or "", m.findtext("name") or "")
        assert key not in out, f"duplicate metric {key}"
        out[key] = {
            "type": m.get("type"),
            "unit": m.get("unit"),
            "value": m.findtext("value"),
            "uuid": m.get("uuid"),
        }
    return out, proc.stderr.decode()


def _between(value: float, a: float, b: float, slack: float, what: str) -> None:
    """value lies within [min(a, b) - slack, max(a, b) + slack]."""
    lo, hi = min(a, b) - slack, max(a, b) + slack
    assert lo <= value <= hi, f"{what}: {value} not in [{lo}, {hi}]"


def _used_kib(r: Reading) -> int:
    """procps 4's "used": MemTotal - MemAvailable."""
    return r.meminfo["MemTotal"] - r.meminfo["MemAvailable"]


def _libvirt_version(v: int) -> str:
    """libvirt's packed version number as text."""
    return f"{v // 1000000}.{(v // 1000) % 1000}.{v % 1000}"


def _os_release_name() -> str:
    """NAME from /etc/os-release."""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise AssertionError("no NAME in /etc/os-release")


@pytest.fixture(scope="module")
def conn() -> Iterator[Conn]:
    """A libvirt-python connection to the test driver (its own instance, same defaults)."""
    c = libvirt.open(URI)
    yield c
    c.close()


def _run_and_read(
    conn: Conn, conf: Path
) -> Tuple[Dict[Tuple[str, str], Dict[str, str | None]], Reading, Reading, str]:
    """Independent readings before and after one dump cycle."""
    before = _read(conn)
    metrics, stderr = _dump(conf)
    after = _read(conn)
    return metrics, before, after, stderr


def _spec_signature(cfg: Config) -> List[Tuple[str, str, str, Tuple[Tuple[str, str], ...]]]:
    """(context, name, type, variables) of each metric, in config order."""
    return [
        (m.context, m.name, m.type, tuple((v.name, v.type) for v in m.variables))
        for m in cfg.metrics
    ]


# --- vhostmd.conf: upstream's default set ------------------------------------


DEFAULT_CONFS = ["vhostmd.conf", "conf/examples/vhostmd-shell.conf"]
SAP_CONFS = ["conf/sap-vhostmd.conf", "conf/examples/sap-vhostmd-shell.conf"]
NATIVE_CONFS = ["vhostmd.conf", "conf/sap-vhostmd.conf"]
SHELL_CONFS = ["conf/examples/vhostmd-shell.conf", "conf/examples/sap-vhostmd-shell.conf"]


@pytest.mark.parametrize("conf", DEFAULT_CONFS)
def test_default_config_loads_with_upstream_metric_set(
    repo_root: Path, golden: Path, conf: str
) -> None:
    """vhostmd.conf validates and keeps upstream's metrics: names, types, contexts, units, order."""
    ours = load_config(repo_root / conf)
    ref = load_config(golden / "reference-configs" / "upstream-vhostmd.xml")
    assert _spec_signature(ours) == _spec_signature(ref)
    assert [m.unit for m in ours.metrics] == [m.unit for m in ref.metrics]
    assert ours.disk_path == "/dev/shm/vhostmd0" == ref.disk_path
    assert ours.disk_size == ref.disk_size == 256 * 1024
    assert ours.update_period == ref.update_period
    assert ours.transports == ref.transports == ("vbd", "virtio")
    assert ours.virtio.channel_path == "/var/lib/libvirt/qemu/channel/target"
    assert ours.virtio.max_channels == 1024
    assert (repo_root / conf).read_text().count('<!DOCTYPE vhostmd SYSTEM "vhostmd.dtd">') == 1


@pytest.mark.parametrize("conf", DEFAULT_CONFS)
def test_default_config_values(repo_root: Path, conn: Conn, conf: str) -> None:
    """Every metric of vhostmd.conf runs on this host and matches /proc and libvirt."""
    cfg = load_config(repo_root / conf)
    metrics, before, after, stderr = _run_and_read(conn, repo_root / conf)
    expected = {(m.context, v.name) for m in cfg.metrics for v in m.variables} | {
        (m.context, m.name) for m in cfg.metrics if m.type != "group"
    }
    assert set(metrics) == expected, f"missing: {expected - set(metrics)}; stderr: {stderr}"
    v = {k: m["value"] or "" for k, m in metrics.items()}
    node = conn.getInfo()  # [model, memory MiB, cpus, mhz, nodes, sockets, cores, threads]

    assert v[("host", "HostName")] == conn.getHostname()
    if shutil.which("rpm") is None:
        assert v[("host", "VirtualizationVendor")] == _os_release_name()
    else:
        assert v[("host", "VirtualizationVendor")]
    assert v[("host", "VirtualizationProductInfo")] == (
        f"{conn.getType()} {_libvirt_version(conn.getVersion())}"
    )
    assert int(v[("host", "TotalPhyCPUs")]) == node[2]
    assert int(v[("host", "NumCPUs")]) == node[2]
    assert int(v[("host", "TotalPhyMem")]) == node[1]
    _between(
        int(v[("host", "UsedMem")]),
        _used_kib(before) / 1024,
        _used_kib(after) / 1024,
        MEM_SLACK_MIB,
        "UsedMem",
    )
    _between(
        int(v[("host", "FreeMem")]),
        before.meminfo["MemAvailable"] / 1024,
        after.meminfo["MemAvailable"] / 1024,
        MEM_SLACK_MIB,
        "FreeMem",
    )
    # Counters only grow: the value lies between the two readings.
    _between(
        int(v[("host", "PagedInMemory")]),
        before.vmstat["pgpgin"],
        after.vmstat["pgpgin"],
        0,
        "PagedInMemory",
    )
    _between(
        int(v[("host", "PagedOutMemory")]),
        before.vmstat["pgpgout"],
        after.vmstat["pgpgout"],
        0,
        "PagedOutMemory",
    )
    # Rates over one second inside the run: bounded by the counters' growth
    # over the whole run; something faults every second (the action itself).
    assert 0 <= int(v[("host", "PageInRate")]) <= after.vmstat["pgpgin"] - before.vmstat["pgpgin"]
    faults = int(v[("host", "PageFaultRate")])
    assert 0 <= faults <= after.vmstat["pgfault"] - before.vmstat["pgfault"]
    if conf in SHELL_CONFS:
        assert faults > 0  # the action's own processes fault within its second
    hz = os.sysconf("SC_CLK_TCK")
    _between(
        float(v[("host", "TotalCPUTime")]),
        before.cpu_ticks / hz,
        after.cpu_ticks / hz,
        0.02,
        "host TotalCPUTime",
    )
    # The test driver's CPU time follows the clock: within the run's window.
    _between(
        float(v[("vm", "TotalCPUTime")]),
        before.dom[4] / 1e9,
        after.dom[4] / 1e9,
        1.0,
        "vm TotalCPUTime",
    )
    assert metrics[("vm", "TotalCPUTime")]["uuid"] == conn.lookupByName("test").UUIDString()
    assert metrics[("vm", "TotalCPUTime")]["unit"] == "s"


# --- conf/sap-vhostmd.conf ---------------------------------------------------


@pytest.mark.parametrize("conf", SAP_CONFS)
def test_sap_config_loads_with_sap_metric_names(repo_root: Path, golden: Path, conf: str) -> None:
    """The SAP profile has exactly SAP's metric names, with the RHEL file's types and MiB units."""
    ours = load_config(repo_root / conf)
    host = {m.name: m for m in ours.metrics if m.context == "host"}
    vm = {m.name: m for m in ours.metrics if m.context == "vm"}
    assert {n: m.type for n, m in host.items()} == SAP_HOST
    assert {n: m.type for n, m in vm.items()} == SAP_VM
    ref = load_config(golden / "reference-configs" / "rhel-sap-vhostmd.conf")
    ref_types = {(m.context, m.name): m.type for m in ref.metrics}
    for m in ours.metrics:
        assert ref_types[(m.context, m.name)] == m.type, m.name
    assert set(ref_types) == {(m.context, m.name) for m in ours.metrics}
    for m in ours.metrics:
        if m.name in SAP_MIB:
            assert m.unit == "MiB", m.name
    assert ours.disk_size >= 64 * 1024  # upstream-based readers need 64 KiB
    assert "vbd" in ours.transports


@pytest.mark.parametrize("conf_name", SAP_CONFS)
def test_sap_config_values(repo_root: Path, conn: Conn, conf_name: str) -> None:
    """Every SAP metric runs on this host and matches /proc and libvirt."""
    conf = repo_root / conf_name
    metrics, before, after, stderr = _run_and_read(conn, conf)
    expected = {("host", n) for n in SAP_HOST} | {("vm", n) for n in SAP_VM}
    assert set(metrics) == expected, f"missing: {expected - set(metrics)}; stderr: {stderr}"
    for (ctx, name), m in metrics.items():
        assert m["type"] == (SAP_HOST if ctx == "host" else SAP_VM)[name]
    v = {k: m["value"] or "" for k, m in metrics.items()}
    node = conn.getInfo()
    nodename = os.uname().nodename

    checks: Dict[Tuple[str, str], Callable[[str], None]] = {}

    def check(ctx: str, name: str) -> Callable[[Callable[[str], None]], Callable[[str], None]]:
        def deco(fn: Callable[[str], None]) -> Callable[[str], None]:
            checks[(ctx, name)] = fn
            return fn

        return deco

    @check("host", "HostName")
    def _(x: str) -> None:
        assert x == nodename

    @check("host", "HostSystemInfo")
    def _(x: str) -> None:
        assert x == nodename.split(".")[0]

    @check("host", "VirtualizationVendor")
    def _(x: str) -> None:
        if shutil.which("rpm") is None:
            assert x == _os_release_name()
        else:
            assert x

    @check("host", "VirtProductInfo")
    def _(x: str) -> None:
        assert x == f"{conn.getType()} {_libvirt_version(conn.getLibVersion())}"

    @check("host", "Time")
    def _(x: str) -> None:
        _between(int(x), before.t, after.t, 1.0, "Time")

    @check("host", "NumberOfPhysicalCPUs")
    def _(x: str) -> None:
        assert int(x) == node[2]

    @check("host", "TotalCPUTime")
    def _(x: str) -> None:
        hz = os.sysconf("SC_CLK_TCK")
        _between(float(x), before.cpu_ticks / hz, after.cpu_ticks / hz, 0.02, "TotalCPUTime")

    def mem(x: str, f: Callable[[Reading], int], what: str) -> None:
        _between(int(x), f(before) / 1024, f(after) / 1024, MEM_SLACK_MIB, what)

    @check("host", "FreePhysicalMemory")
    def _(x: str) -> None:
        mem(x, lambda r: r.meminfo["MemFree"], "FreePhysicalMemory")

    @check("host", "FreeVirtualMemory")
    def _(x: str) -> None:
        mem(x, lambda r: r.meminfo["MemFree"] + r.meminfo["SwapFree"], "FreeVirtualMemory")

    @check("host", "MemoryAllocatedToVirtualServers")
    def _(x: str) -> None:
        mem(x, _used_kib, "MemoryAllocatedToVirtualServers")

    @check("host", "UsedVirtualMemory")
    def _(x: str) -> None:
        mem(
            x,
            lambda r: _used_kib(r) + r.meminfo["SwapTotal"] - r.meminfo["SwapFree"],
            "UsedVirtualMemory",
        )

    page = os.sysconf("SC_PAGE_SIZE")

    @check("host", "PagedInMemory")
    def _(x: str) -> None:
        _between(
            int(x),
            before.vmstat["pswpin"] * page // MIB,
            after.vmstat["pswpin"] * page // MIB,
            0,
            "PagedInMemory",
        )

    @check("host", "PagedOutMemory")
    def _(x: str) -> None:
        _between(
            int(x),
            before.vmstat["pswpout"] * page // MIB,
            after.vmstat["pswpout"] * page // MIB,
            0,
            "PagedOutMemory",
        )

    @check("vm", "TotalCPUTime")
    def _(x: str) -> None:
        _between(float(x), before.dom[4] / 1e9, after.dom[4] / 1e9, 1.0, "vm TotalCPUTime")

    @check("vm", "ResourceProcessorLimit")
    def _(x: str) -> None:
        assert int(x) == after.dom[3]

    @check("vm", "ResourceMemoryLimit")
    def _(x: str) -> None:
        assert int(x) == after.dom[1] // 1024

    @check("vm", "PhysicalMemoryAllocatedToVirtualSystem")
    def _(x: str) -> None:
        assert int(x) == after.dom[2] // 1024

    assert set(checks) == expected  # every metric has its independent check
    for key, fn in checks.items():
        fn(v[key])
    uuid = conn.lookupByName("test").UUIDString()
    assert {m["uuid"] for (ctx, _), m in metrics.items() if ctx == "vm"} == {uuid}


@pytest.mark.parametrize("conf", NATIVE_CONFS)
def test_shipped_configs_are_native(repo_root: Path, conf: str) -> None:
    """Every metric of a shipped config names a built-in source, none a shell action."""
    cfg = load_config(repo_root / conf)
    assert cfg.metrics
    for spec in cfg.metrics:
        assert spec.source is not None and spec.action == "", spec.name


@pytest.mark.parametrize("native, shell", list(zip(NATIVE_CONFS, SHELL_CONFS)))
def test_native_and_shell_twins_agree(repo_root: Path, native: str, shell: str) -> None:
    """A shipped config and its shell example: same globals and metric names, types, units."""
    a, b = load_config(repo_root / native), load_config(repo_root / shell)
    assert _spec_signature(a) == _spec_signature(b)
    assert [m.unit for m in a.metrics] == [m.unit for m in b.metrics]
    assert (a.disk_path, a.disk_size, a.update_period, a.transports, a.virtio) == (
        b.disk_path, b.disk_size, b.update_period, b.transports, b.virtio
    )


@pytest.mark.parametrize("conf", SHELL_CONFS)
def test_actions_are_posix_sh(repo_root: Path, conf: str) -> None:
    """Every action parses with a strict POSIX shell (dash, or busybox sh), not just bash."""
    shells = [s for s in (shutil.which("dash"), shutil.which("posh")) if s]
    if not shells and shutil.which("busybox"):
        shells = [f"{shutil.which('busybox')} sh"]
    if not shells:
        pytest.skip("no dash, posh or busybox to check POSIX syntax")
    cfg = load_config(repo_root / conf)
    for spec in cfg.metrics:
        for sh in shells:
            proc = subprocess.run(
                [*sh.split(), "-n", "-c", spec.action], capture_output=True, timeout=10, check=False
            )
            assert proc.returncode == 0, (spec.name, sh, proc.stderr)


# --- systemd unit ------------------------------------------------------------


def _unit(repo_root: Path) -> configparser.ConfigParser:
    """conf/vhostmd.service parsed as INI (systemd's syntax is a superset for this file)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(repo_root / "conf" / "vhostmd.service")
    return parser


def test_unit_settings(repo_root: Path) -> None:
    """The unit runs the daemon in the foreground, reloads with SIGHUP and is hardened."""
    unit = _unit(repo_root)
    svc = unit["Service"]
    assert svc["Type"] == "simple"
    exec_start = svc["ExecStart"].split()
    assert "-d" in exec_start
    assert exec_start[exec_start.index("-f") + 1] == "/etc/vhostmd/vhostmd.conf"
    assert exec_start[exec_start.index("-p") + 1].startswith(
        "/run/" + svc["RuntimeDirectory"] + "/"
    )
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "libvirtd.service" in unit["Unit"]["After"].split()
    assert svc["ProtectSystem"] == "strict"
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["ProtectHome"] == "yes" and svc["PrivateTmp"] == "yes"
    assert svc["RestrictAddressFamilies"] == "AF_UNIX"
    assert "PrivateDevices" not in svc  # would hide /dev/shm from QEMU
    assert set(svc["CapabilityBoundingSet"].split()) == {
        "CAP_DAC_OVERRIDE",
        "CAP_SETUID",
        "CAP_SETGID",
    }
    # The shipped configs' disks must be writable under ProtectSystem=strict.
    writable = svc["ReadWritePaths"].split()
    for conf in (*NATIVE_CONFS, *SHELL_CONFS):
        disk = load_config(repo_root / conf).disk_path
        assert any(disk.startswith(w.rstrip("/") + "/") for w in writable), disk
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_unit_verifies(repo_root: Path, tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit without a single warning."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    vhostmd = Path(sys.executable).parent / "vhostmd"
    if not vhostmd.exists():
        pytest.skip("the vhostmd console script is not installed in this environment")
    text = (repo_root / "conf" / "vhostmd.service").read_text()
    # verify checks that ExecStart's program exists: point it at ours.
    (tmp_path / "vhostmd.service").write_text(text.replace("/usr/local/sbin/vhostmd", str(vhostmd)))
    # ... and that man finds the Documentation= pages: the repository's, laid
    # out as a man tree (MANPATH), so a page named there but missing fails.
    for page in (repo_root / "docs" / "man").iterdir():
        section = tmp_path / "man" / f"man{page.suffix[1:]}"
        section.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, section / page.name)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "vhostmd.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "MANPATH": str(tmp_path / "man")},
    )
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def test_unit_lifecycle(repo_root: Path, tmp_path: Path) -> None:
    """The daemon run with ExecStart's options stays in front, survives SIGHUP, stops on SIGTERM."""
    svc = _unit(repo_root)["Service"]
    conf = tmp_path / "vhostmd.conf"
    disk = tmp_path / "shm" / "vhostmd0"
    conf.write_text(
        (repo_root / "vhostmd.conf")
        .read_text()
        .replace("/dev/shm/vhostmd0", str(disk))
        .replace("<update_period>5</update_period>", "<update_period>1</update_period>")
    )
    args = svc["ExecStart"].split()[1:]
    args[args.index("-f") + 1] = str(conf)
    pidfile = tmp_path / "run" / "vhostmd.pid"
    pidfile.parent.mkdir()
    args[args.index("-p") + 1] = str(pidfile)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhostmd_py.cli", *args, "-c", URI],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            disk.exists() and b"<metrics>" in disk.read_bytes()[:64]
        ):
            assert proc.poll() is None, proc.communicate()[1].decode()
            time.sleep(0.1)
        assert b"<name>HostName</name>" in disk.read_bytes()
        # Type=simple: the process systemd started is the daemon itself.
        assert int(pidfile.read_text().split()[0]) == proc.pid
        proc.send_signal(signal.SIGHUP)  # ExecReload
        time.sleep(1.5)
        assert proc.poll() is None, "the daemon died on SIGHUP"
        proc.send_signal(signal.SIGTERM)  # systemctl stop
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert not pidfile.exists()
    assert disk.read_bytes()[4:8] == b"\0\0\0\0"  # busy flag clear


# --- install layout ----------------------------------------------------------


def _install(repo_root: Path, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """scripts/install-host into ROOT, files only."""
    return subprocess.run(
        [
            "bash",
            str(repo_root / "scripts" / "install-host"),
            "--root",
            str(root),
            "--no-packages",
            "--no-venv",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_install_layout(repo_root: Path, tmp_path: Path) -> None:
    """install-host lays out /etc/vhostmd (config, DTDs) and the unit; keeps an edited config."""
    proc = _install(repo_root, tmp_path)
    assert proc.returncode == 0, proc.stderr
    etc = tmp_path / "etc" / "vhostmd"
    assert (etc / "vhostmd.conf").read_bytes() == (repo_root / "vhostmd.conf").read_bytes()
    for dtd in ("vhostmd.dtd", "metric.dtd"):
        shipped = (repo_root / "vhostmd_py" / "data" / dtd).read_bytes()
        assert (etc / dtd).read_bytes() == shipped
    unit = tmp_path / "etc" / "systemd" / "system" / "vhostmd.service"
    assert unit.read_bytes() == (repo_root / "conf" / "vhostmd.service").read_bytes()
    assert oct((etc / "vhostmd.conf").stat().st_mode & 0o777) == "0o644"
    # The installed config resolves its DOCTYPE next to itself and loads.
    assert (
        load_config(etc / "vhostmd.conf", dtd=etc / "vhostmd.dtd").disk_path == "/dev/shm/vhostmd0"
    )

    edited = (etc / "vhostmd.conf").read_text().replace("<update_period>5<", "<update_period>7<")
    (etc / "vhostmd.conf").write_text(edited)
    proc = _install(repo_root, tmp_path, "--profile", "sap")
    assert proc.returncode == 0, proc.stderr
    assert (etc / "vhostmd.conf").read_text() == edited  # the admin's file is kept
    new = etc / "vhostmd.conf.new"
    assert new.read_bytes() == (repo_root / "conf" / "sap-vhostmd.conf").read_bytes()
    assert "vhostmd.conf.new" in proc.stderr


def test_install_rejects_unknown_profile(repo_root: Path, tmp_path: Path) -> None:
    """An unknown --profile is refused with exit 2 and installs nothing."""
    proc = _install(repo_root, tmp_path, "--profile", "nosuch")
    assert proc.returncode == 2
    assert "unknown profile" in proc.stderr
    assert not (tmp_path / "etc").exists()
