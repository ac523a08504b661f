"""End to end with real guests: libvirtd + QEMU (TCG), our daemon on the host, our tools inside.

`scripts/e2e-guest` installs what it needs, starts a private libvirtd of its
own, runs our daemon against qemu:///system (in that libvirtd's mount
namespace) with the vbd and virtio transports, and boots two
guests: a Debian one that runs vm-dump-metrics -b/-i and the libmetrics API,
and a busybox-only one that speaks to its virtio port with shell tools. The
guests print their evidence on the serial console; the assertions are here.
Skipped only when this machine cannot run QEMU (exit 77), or, outside CI,
when it is not set up and may not be (exit 78; see tests/e2e/conftest.py).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from helpers.e2e_setup import SetupFailure, skip_for, workdir
from helpers.e2e_values import (
    NATIVE_PREFIX,
    cpu_history,
    cpu_share,
    load_values,
    marker,
    png_size,
    vhostmdctl,
    window_stats,
)
from lxml import etree

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FULL = "vhostmd-e2e-full"
MINI = "vhostmd-e2e-mini"
FULL_VCPUS = 2  # as scripts/e2e-guest defines them: the vm NumCPUs must tell them apart
MINI_VCPUS = 1
CHANNEL_DIR = "/var/lib/libvirt/qemu/channel/target"
# Generous: a cold run (packages, kernel, debootstrap) takes about 2-5 minutes.
SCRIPT_TIMEOUT_S = 1500
# The metrics the full guest's domain metadata denies it (scripts/e2e-guest).
POLICY_PREFIX = "E2EPolicy"
HOST_VALUES = {
    "E2EAnswer": ("int32", "42"),
    "E2EHostTag": ("string", "e2e-host"),
    "TotalPhyCPUs": ("uint32", "8"),
    "NumCPUs": ("uint32", "7"),
    "TotalCPUTime": ("real64", "1234.5"),
    "TotalPhyMem": ("uint64", "4096"),
    "UsedMem": ("uint64", "1000"),
    "FreeMem": ("uint64", "3000"),
    "PagedInMemory": ("uint64", "11"),
    "PagedOutMemory": ("uint64", "12"),
}


def _parse(doc: bytes) -> Any:
    """Parse a metrics document with a parser that resolves nothing."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    return etree.fromstring(doc, parser)


def _metrics(doc: bytes) -> List[Dict[str, str | None]]:
    """The <metric> elements of a document as dicts."""
    return [
        {
            "type": m.get("type"),
            "context": m.get("context"),
            "id": m.get("id"),
            "uuid": m.get("uuid"),
            "unit": m.get("unit"),
            "name": m.findtext("name"),
            "value": m.findtext("value"),
        }
        for m in _parse(doc).findall("metric")
    ]


def _results(console: Path) -> Dict[str, Any]:
    """The E2E-RESULT records a guest printed on its serial console."""
    out: Dict[str, Any] = {}
    # The serial line discipline turns \n into \r\n.
    for line in console.read_bytes().decode(errors="replace").splitlines():
        line = line.strip("\r")
        if not line.startswith("E2E-RESULT "):
            continue
        _, tag, data = line.split(" ", 2)
        raw = base64.b64decode(data, validate=True)
        out[tag] = raw if tag.startswith("mini-") else json.loads(raw)
    return out


def _stdout(rec: Dict[str, Any]) -> bytes:
    """A tool run's stdout bytes."""
    return base64.b64decode(rec["stdout_b64"])


def _leftover_processes(out: Path) -> List[str]:
    """What the run writing to OUT started and still runs: QEMU, our daemon, libvirtd, virtlogd."""
    left = []
    started = out / "started-pids"
    pids = started.read_text().split() if started.exists() else []
    names = dict(zip(pids[1::2], pids[0::2]))  # pid -> what
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # Other runs (another pytest session) use other OUT directories; a
        # recorded pid counts only while it still runs the same program.
        what = names.get(pid)
        if str(out) in cmd or (what is not None and what in cmd):
            left.append(f"{pid}: {cmd[:200]}")
    return left


def _out_dir(workdir: Path, tag: str) -> Path:
    """A results directory for this pytest process; those of finished sessions are removed."""
    for old in workdir.glob("pytest-*"):
        pid = old.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    out = workdir / f"pytest-{os.getpid()}-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    return out


E2eRun = Tuple[Path, Dict[str, Any], Dict[str, float]]


def _run_script(repo_root: Path) -> E2eRun | SetupFailure:
    """Run scripts/e2e-guest once; its output dir, the domains it ran, its timings."""
    out = _out_dir(workdir(), "run")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        ["bash", str(repo_root / "scripts" / "e2e-guest"), "--workdir", str(workdir()),
         "--out", str(out), "--python", sys.executable],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the script's trap destroys the guests and
        # stops the daemons it started.
        proc.terminate()
        _, stderr = proc.communicate(timeout=120)
        return SetupFailure("scripts/e2e-guest", f"did not finish in {SCRIPT_TIMEOUT_S} s:\n"
                            + stderr[-6000:])
    wall = time.monotonic() - t0
    skip_for(proc.returncode, stderr)
    if proc.returncode != 0:
        # The script prints its failure as one block: that block, else the end.
        block = stderr[stderr.find("=== e2e"):] if "=== e2e" in stderr else stderr[-6000:]
        return SetupFailure(f"scripts/e2e-guest (exit {proc.returncode})", block)
    left = _leftover_processes(out)
    assert not left, f"left running after the script: {left}"
    timings = {}
    for line in (out / "timings.txt").read_text().splitlines():
        step, seconds = line.split()
        timings[step] = float(seconds)
    timings["pytest-wall"] = wall
    sys.stderr.write(f"\ne2e timings (s): {json.dumps(timings)}\n")
    domains = json.loads((out / "domains.json").read_text())
    return out, domains, timings


@pytest.fixture(scope="module")
def _e2e_module(e2e_machine: None, repo_root: Path) -> E2eRun | SetupFailure:
    return _run_script(repo_root)


@pytest.fixture
def e2e_run(_e2e_module: E2eRun | SetupFailure, request: pytest.FixtureRequest) -> E2eRun:
    """The one run of scripts/e2e-guest (per module); a failure of it reported once."""
    if isinstance(_e2e_module, SetupFailure):
        _e2e_module.fail(request.node.nodeid)
    assert not isinstance(_e2e_module, SetupFailure)
    return _e2e_module


@pytest.fixture
def full(e2e_run: E2eRun) -> Dict[str, Any]:
    """The full guest's records."""
    return _results(e2e_run[0] / f"{FULL}-console.log")


@pytest.fixture
def mini(e2e_run: E2eRun) -> Dict[str, Any]:
    """The minimal guest's records."""
    return _results(e2e_run[0] / f"{MINI}-console.log")


def _ident(domains: Dict[str, Any], name: str) -> str:
    """What `echo NAME-VMID-UUID` must give for a domain."""
    d = domains[name]
    return f"{name}-{d['id']}-{d['uuid']}"


def _assert_host_metrics(doc: bytes) -> None:
    """Every deterministic host metric is there with its type and value."""
    host = {m["name"]: m for m in _metrics(doc) if m["context"] == "host"}
    for name, (typ, value) in HOST_VALUES.items():
        assert name in host, f"host metric {name} missing"
        assert (host[name]["type"], host[name]["value"]) == (typ, value)
    assert host["TotalPhyMem"]["unit"] == "MiB"
    assert host["TotalCPUTime"]["unit"] == "s"


def _assert_vm_block(doc: bytes, domains: Dict[str, Any], name: str, vcpus: int) -> None:
    """This domain's vm metrics are there, tagged with its id and UUID, with real values."""
    d = domains[name]
    vm = {m["name"]: m for m in _metrics(doc) if m["context"] == "vm" and m["uuid"] == d["uuid"]}
    # The built-in-source metrics are checked by the e2e value tests, the
    # policy's by the policy tests (end of file).
    vm = {k: v for k, v in vm.items()
          if not (k or "").startswith((NATIVE_PREFIX, POLICY_PREFIX))}
    assert set(vm) == {"E2EIdent", "NumCPUs", "TotalCPUTime"}, vm
    for m in vm.values():
        assert m["id"] == str(d["id"])
    assert vm["E2EIdent"]["value"] == _ident(domains, name)
    assert vm["NumCPUs"]["type"] == "uint32"
    assert int(vm["NumCPUs"]["value"] or "") == vcpus == d["vcpus"]
    assert vm["TotalCPUTime"]["type"] == "real64"
    # libvirt's CPU time of a guest that has been booting under TCG.
    assert 0.0 < float(vm["TotalCPUTime"]["value"] or "") < 3600.0


def test_domains_run_with_channel(e2e_run: Tuple[Path, Dict[str, Any], Dict[str, float]]) -> None:
    """libvirt ran both domains with the vhostmd channel where our daemon looks."""
    _, domains, _ = e2e_run
    assert domains[FULL]["vcpus"] == FULL_VCPUS and domains[MINI]["vcpus"] == MINI_VCPUS
    for name, d in domains.items():
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", d["uuid"])
        assert d["channel"] == f"{CHANNEL_DIR}/domain-{d['id']}-{name}/org.github.vhostmd.1"


def test_guest_runs_our_package(full: Dict[str, Any], e2e_run: Any) -> None:
    """The guest's Debian python3 runs the guest distribution alone: the wheel, nothing of the host.

    The guest root has Debian's python3-lxml and python3-cffi (importable), so
    the check is what was loaded: neither they nor vhostmd_py, in the checker
    after all its API calls, nor in fresh runs of the wheel's vm-dump-metrics.
    """
    info = full["info"]
    assert info["python"].startswith("3."), info
    dist = info["guest_dist"]
    assert "error" not in dist, dist["error"]
    assert dist["vhostmd_py"] is False, dist  # not in the guest at all
    assert dist["lxml"] and dist["cffi"], dist  # there, so "not loaded" means something
    site = "/opt/vhostmd-py/site/"
    assert dist["files"] == {
        "vhostmd_guest": site + "vhostmd_guest/__init__.py",
        "vhostmd_wire": site + "vhostmd_wire/__init__.py",
    }, dist
    # The version of the wheel this run built, and only its two packages.
    wheel = (e2e_run[0] / "guest-wheel.txt").read_text().strip()
    assert wheel == f"vhostmd_py_guest-{dist['dist_version']}-py3-none-any.whl"
    assert {f.split("/", 1)[0] for f in dist["dist_files"]} == {
        "vhostmd_guest", "vhostmd_wire", f"vhostmd_py_guest-{dist['dist_version']}.dist-info"}
    assert not [f for f in dist["dist_files"] if f.endswith(".so")], dist["dist_files"]
    mods = full["modules"]
    assert mods["checker"] == {"guest_loaded": True, "forbidden": []}, mods["checker"]
    for run in ("tool-b", "tool-i"):
        assert mods[run]["rc"] == 0, mods[run]
        assert mods[run]["guest_loaded"] and mods[run]["forbidden"] == [], mods[run]
    assert info["uuid"] == e2e_run[1][FULL]["uuid"]
    assert info["virtio_ports"] == ["org.github.vhostmd.1"]


def test_vbd_dump_has_host_and_both_vms(full: Dict[str, Any], e2e_run: Any) -> None:
    """vm-dump-metrics -b: the whole disk document, host metrics and every VM's own."""
    rec = full["dump-b"]
    assert rec["rc"] == 0, rec["stderr"]
    doc = _stdout(rec)
    assert doc.startswith(b"<metrics>\n") and doc.endswith(b"</metrics>\n")
    _assert_host_metrics(doc)
    _assert_vm_block(doc, e2e_run[1], FULL, FULL_VCPUS)
    _assert_vm_block(doc, e2e_run[1], MINI, MINI_VCPUS)


def test_virtio_dump_has_only_this_vm(full: Dict[str, Any], e2e_run: Any) -> None:
    """vm-dump-metrics -i: host metrics and this VM's, never the other guest's."""
    rec = full["dump-i"]
    assert rec["rc"] == 0, rec["stderr"]
    reply = _stdout(rec)
    assert reply.startswith(b"<metrics>\n") and reply.endswith(b"</metrics>\n\n")
    _assert_host_metrics(reply)
    _assert_vm_block(reply, e2e_run[1], FULL, FULL_VCPUS)
    assert e2e_run[1][MINI]["uuid"].encode() not in reply
    assert {m["uuid"] for m in _metrics(reply) if m["context"] == "vm"} == {
        e2e_run[1][FULL]["uuid"]
    }


def test_minimal_guest_virtio_isolation(mini: Dict[str, Any], e2e_run: Any) -> None:
    """The busybox guest's virtio reply has its own metrics only, while the disk shows both VMs."""
    domains = e2e_run[1]
    reply = mini["mini-virtio"]
    assert reply.startswith(b"<metrics>\n") and reply.endswith(b"</metrics>\n")
    _assert_host_metrics(reply)
    _assert_vm_block(reply, domains, MINI, MINI_VCPUS)
    assert domains[FULL]["uuid"].encode() not in reply
    disk = mini["mini-disk"]
    _assert_vm_block(disk, domains, FULL, FULL_VCPUS)
    _assert_vm_block(disk, domains, MINI, MINI_VCPUS)


def test_default_source_and_dest_file(full: Dict[str, Any], e2e_run: Any) -> None:
    """No source flag reads the disk; -d writes the document to the file, not stdout."""
    auto = full["dump-auto"]
    assert auto["rc"] == 0, auto["stderr"]
    _assert_vm_block(_stdout(auto), e2e_run[1], MINI, MINI_VCPUS)
    dest = full["dump-dest"]
    assert dest["rc"] == 0 and dest["stdout_b64"] == "", dest
    doc = base64.b64decode(dest["dest_b64"])
    _assert_host_metrics(doc)
    _assert_vm_block(doc, e2e_run[1], FULL, FULL_VCPUS)
    assert full["dump-help"]["rc"] == 2


def test_libmetrics_api(full: Dict[str, Any], e2e_run: Any) -> None:
    """get_metric and the record fillers give typed values, this VM's over disk and virtio."""
    api = full["libmetrics"]
    assert api["import"]["ok"], api["import"]
    me = e2e_run[1][FULL]
    for src in ("disk", "virtio"):
        got = {k.split(":", 1)[1]: v for k, v in api.items() if k.startswith(src + ":")}
        assert got["E2EAnswer:host"]["value"]["value"] == 42
        assert got["E2EAnswer:host"]["value"]["value_type"] == "int"
        assert got["E2EHostTag:host"]["value"]["value"] == "e2e-host"
        assert got["TotalCPUTime:host"]["value"]["value"] == 1234.5
        ident = got["E2EIdent:vm"]["value"]
        # The disk holds two VMs: the lookup must pick this one by its UUID.
        assert ident["value"] == _ident(e2e_run[1], FULL)
        assert ident["vm_uuid"] == me["uuid"] and ident["vm_id"] == me["id"]
        assert got["NumCPUs:vm"]["value"]["value"] == FULL_VCPUS
        assert isinstance(got["TotalCPUTime:vm"]["value"]["value"], float)
        assert got["TotalCPUTime:vm"]["value"]["value"] > 0
        assert not got["NoSuchMetric:host"]["ok"]
        assert "NotFound" in got["NoSuchMetric:host"]["error"]
        vm_cpu = got["get_vm_cpu_metrics"]["value"]
        assert vm_cpu["num_phys_cpus_utilized"] == FULL_VCPUS
        assert vm_cpu["total_cpu_time"] > 0
    assert api["disk:get_host_cpu_metrics"]["value"] == {
        "total_phys_cpus": 8,
        "num_phys_cpus_utilized": 7,
        "total_cpu_time": 1234.5,
    }
    assert api["disk:get_host_memory_metrics"]["value"] == {
        "total_physical_memory": 4096,
        "used_physical_memory": 1000,
        "free_physical_memory": 3000,
        "paged_out_memory": 12,
        "paged_in_memory": 11,
        "page_in_rate": None,
        "page_fault_rate": None,
    }
    dumped = base64.b64decode(api["dump_metrics"]["value"]["bytes_b64"])
    assert base64.b64decode(api["file:/tmp/api-dump.xml"]) == dumped
    _assert_vm_block(dumped, e2e_run[1], MINI, MINI_VCPUS)
    vreply = base64.b64decode(api["file:/tmp/api-virtio.xml"])
    _assert_vm_block(vreply, e2e_run[1], FULL, FULL_VCPUS)
    assert e2e_run[1][MINI]["uuid"].encode() not in vreply


def _assert_freshness(doc: bytes) -> str:
    """PublicationTime, UpdatePeriod and HostIdentity are in the host part; the identity."""
    host = {m["name"]: m for m in _metrics(doc) if m["context"] == "host"}
    published = host["PublicationTime"]
    assert (published["type"], published["unit"]) == ("real64", "s")
    # Rendered during this run (the guests ran for minutes at most).
    assert abs(float(published["value"] or "") - time.time()) < 3600
    assert (host["UpdatePeriod"]["type"], host["UpdatePeriod"]["value"]) == ("uint32", "1")
    identity = host["HostIdentity"]["value"] or ""
    assert re.fullmatch(r"[0-9a-f]{32}", identity), identity
    return identity


def _assert_own_disk(doc: bytes, domains: Dict[str, Any], me: str, other: str, vcpus: int) -> None:
    """A per-VM disk's document: the host's metrics and ME's block, never OTHER's UUID."""
    assert doc.startswith(b"<metrics>\n") and doc.endswith(b"</metrics>\n")
    _assert_host_metrics(doc)
    _assert_vm_block(doc, domains, me, vcpus)
    assert domains[other]["uuid"].encode() not in doc
    assert {m["uuid"] for m in _metrics(doc) if m["context"] == "vm"} == {domains[me]["uuid"]}


def test_pervm_disk_full_guest(full: Dict[str, Any], e2e_run: Any) -> None:
    """vm-dump-metrics -b --disk on the guest's own disk: host metrics and its own only."""
    domains = e2e_run[1]
    assert full["pervm-device"]["device"] == "/dev/vdc", full["pervm-device"]
    rec = full["pervm-dump-b"]
    assert rec["rc"] == 0, rec["stderr"]
    doc = _stdout(rec)
    _assert_own_disk(doc, domains, FULL, MINI, FULL_VCPUS)
    identity = _assert_freshness(doc)
    # The same host identity on the shared disk (one host).
    assert _assert_freshness(_stdout(full["dump-b"])) == identity
    api = full["pervm-libmetrics"]
    assert api["E2EIdent:vm"]["value"]["value"] == _ident(domains, FULL), api
    assert api["E2EAnswer:host"]["value"]["value"] == 42
    assert api["HostIdentity:host"]["value"]["value"] == identity
    assert api["UpdatePeriod:host"]["value"]["value"] == 1


def test_pervm_disk_minimal_guest(mini: Dict[str, Any], e2e_run: Any) -> None:
    """The busybox guest reads its own disk with dd+sed: its metrics only, never the other's."""
    domains = e2e_run[1]
    doc = mini["mini-pervm"]
    _assert_own_disk(doc, domains, MINI, FULL, MINI_VCPUS)
    _assert_freshness(doc)


def test_pervm_hook_prepared_and_released(
    e2e_run: Tuple[Path, Dict[str, Any], Dict[str, float]]
) -> None:
    """The hook made each disk at prepare and removed it at release."""
    out = e2e_run[0]
    lines = (out / "pervm-hook.txt").read_text().splitlines()
    assert sorted(lines) == sorted([
        f"{MINI} prepare 1", f"{FULL} prepare 1",
        f"{MINI} release removed", f"{FULL} release removed",
    ])
    log = (out / "daemon.log").read_text()
    assert "Using per-VM metrics disks" in log


def test_daemon_stopped_cleanly(e2e_run: Tuple[Path, Dict[str, Any], Dict[str, float]]) -> None:
    """Our daemon ran against qemu:///system without errors and exited 0 on SIGTERM."""
    out = e2e_run[0]
    assert (out / "daemon.exit").read_text().strip() == "0"
    log = (out / "daemon.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "Activating virtio" in log


def test_interrupted_run_leaves_nothing(
    repo_root: Path, e2e_run: Tuple[Path, Dict[str, Any], Dict[str, float]]
) -> None:
    """SIGTERM while the guests run: the trap destroys them and stops everything it started."""
    workdir = e2e_run[0].parent  # caches are warm after the first run
    out = _out_dir(workdir, "interrupted")
    proc = subprocess.Popen(
        [
            "bash",
            str(repo_root / "scripts" / "e2e-guest"),
            "--workdir",
            str(workdir),
            "--out",
            str(out),
            "--python",
            sys.executable,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        # domains.json is written once both guests run.
        while not (out / "domains.json").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the guests never started"
            time.sleep(0.2)
        running = _leftover_processes(out)
        assert any(FULL in p for p in running) and any(MINI in p for p in running), running
        proc.terminate()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    assert "cleanup done" in stderr
    # The script's stderr tee (a process substitution) ends when it reads the
    # script's last bytes, a moment after the script: what is still there
    # after 3 s was left behind.
    left = _leftover_processes(out)
    until = time.monotonic() + 3.0
    while left and time.monotonic() < until:
        time.sleep(0.1)
        left = _leftover_processes(out)
    assert not left, f"left running after SIGTERM: {left}"
    assert not Path("/dev/shm/vhostmd-e2e").exists()


# --- e2e values: built-in values against independent readings,
# the bulk path, the history of a burning and an idle guest, the graph --------

# Thresholds (per-vCPU-normalised CPU %, capped at 100).
BURN_MIN_PCT = 50.0
IDLE_MAX_PCT = 20.0


def _native(rec: Dict[str, Any], uuid: str) -> Dict[str, int]:
    """The E2ENative* values the document carried for a VM, as ints."""
    return {k: int(v) for k, v in rec["doc"]["vms"].get(uuid, {}).items()}


def test_builtin_values_take_the_bulk_path(
    e2e_run: Tuple[Path, Dict[str, Any], Dict[str, float]]
) -> None:
    """On qemu:///system the VM fields come from getAllDomainStats, every group of them."""
    log = (e2e_run[0] / "daemon.log").read_text()
    for group in ("info", "block"):
        assert f"libvirt statistics group {group}: bulk call" in log, log[-3000:]
    assert "per-domain calls" not in log
    assert "no bulk domain statistics" not in log


def test_builtin_values_match_independent_readings(
    e2e_run: Tuple[Path, Dict[str, Any], Dict[str, float]]
) -> None:
    """Every published built-in value against readings taken around it by another client.

    Reading A, two publications, the document, reading B (host-values.py).
    Bulk statistics asked by that client: A <= value <= B for the counters
    (CPU time, read bytes and requests of every disk), equality for vCPUs and
    maximum memory. Per-domain calls: virDomainBlockStats brackets the disk
    counters exactly; virDomainGetInfo's CPU time (process ticks) within two
    ticks. Host CPUs equal virNodeGetInfo, MemTotal /proc/meminfo's.
    """
    out, domains, _ = e2e_run
    samples, _ = load_values(out)
    checked = {FULL: 0, MINI: 0}
    worst_tick_gap = 0
    for rec in samples:
        a, b, host = rec["before"], rec["after"], rec["doc"]["host"]
        if "E2ENativeHostCpus" not in host:
            # The daemon left the libvirt statistics out of that cycle (its
            # deadline passed: it logs so); no bracket to check.
            continue
        assert int(host["E2ENativeHostCpus"]) == a["node_cpus"] == b["node_cpus"]
        assert int(host["E2ENativeHostMemTotal"]) == a["mem_total_kib"] // 1024
        tick = 10**9 // a["clk_tck"]
        for name in (FULL, MINI):
            if name not in a["domains"] or name not in b["domains"]:
                continue  # not running at both readings
            da, db = a["domains"][name], b["domains"][name]
            ba, bb = da["bulk"], db["bulk"]
            assert da["uuid"] == db["uuid"] == domains[name]["uuid"]
            got = _native(rec, da["uuid"])
            assert got, f"{name} running at A and B but not in the document"
            assert got["E2ENativeVcpus"] == ba["vcpus"] == da["vcpus"] == domains[name]["vcpus"]
            assert got["E2ENativeMemMaxKib"] == ba["max_kib"] == da["max_kib"]
            cpu = got["E2ENativeCpuTimeNs"]
            assert ba["cpu_time"] <= cpu <= bb["cpu_time"], (name, rec)
            assert da["cpu_time"] - 2 * tick <= cpu <= db["cpu_time"] + 2 * tick, (name, rec)
            worst_tick_gap = max(worst_tick_gap, cpu - db["cpu_time"])
            # One metric per disk of the domain XML, named .DEV.
            per_dev = {k.split(".", 1)[1] for k in got if k.startswith(NATIVE_PREFIX + "DiskRd")}
            assert per_dev == set(da["disks"]) == set(ba["disks"]), (per_dev, da["disks"])
            for dev in da["disks"]:
                for field, metric in (("rd_bytes", "DiskRdBytes"), ("rd_req", "DiskRdReq")):
                    value = got[f"{NATIVE_PREFIX}{metric}.{dev}"]
                    assert ba["disks"][dev][field] <= value <= bb["disks"][dev][field], rec
                    assert da["disks"][dev][field] <= value <= db["disks"][dev][field], rec
            checked[name] += 1
    sys.stderr.write(
        f"\ne2e values: bracketed samples per VM {checked}; published CPU time exceeded "
        f"virDomainGetInfo's later reading by at most {worst_tick_gap / 1e6:.1f} ms\n"
    )
    assert checked[FULL] >= 3 and checked[MINI] >= 3, checked


def test_builtin_counters_grow_with_the_guest(
    full: Dict[str, Any], e2e_run: Tuple[Path, Dict[str, Any], Dict[str, float]]
) -> None:
    """CPU time grows while the guest runs; a disk's read bytes grow by what the guest read."""
    out, domains, _ = e2e_run
    samples, markers = load_values(out)
    uuid = domains[FULL]["uuid"]
    mine = [r for r in samples if _native(r, uuid)]
    cpu = [_native(r, uuid)["E2ENativeCpuTimeNs"] for r in mine]
    assert len(cpu) >= 3 and all(x < y for x, y in zip(cpu, cpu[1:])), cpu
    load = full["load"]
    assert "read_error" not in load, load
    dev = load["device"].rsplit("/", 1)[1]
    console = f"{FULL}-console.log"
    read_start = marker(markers, console, "E2E-READ-START")
    read_end = marker(markers, console, "E2E-READ-END")
    # The last document whose reading B came before the guest began to read,
    # and the first whose reading A came after it finished.
    before = [r for r in mine if r["after"]["wall"] <= read_start]
    after = [r for r in mine if r["before"]["wall"] >= read_end]
    assert before and after, (read_start, read_end, [r["before"]["wall"] for r in mine])
    key = f"{NATIVE_PREFIX}DiskRdBytes.{dev}"
    grown = _native(after[0], uuid)[key] - _native(before[-1], uuid)[key]
    sys.stderr.write(
        f"\ne2e values: {FULL} {dev} read bytes grew {grown} across a guest O_DIRECT read "
        f"of {load['read_bytes']} B in {load['read_s']:.2f} s; CPU time {cpu[0]} -> {cpu[-1]} ns "
        f"over {len(cpu)} documents\n"
    )
    assert load["read_bytes"] >= 32 << 20
    assert grown >= load["read_bytes"]


def test_history_shows_burning_and_idle_guest(
    full: Dict[str, Any], e2e_run: Tuple[Path, Dict[str, Any], Dict[str, float]]
) -> None:
    """vhostmdctl history: the burner's CPU % is what libvirt says it got; the idle one's low.

    The burner's history mean over the burn must agree with its share computed
    from libvirt's CPU time at the burn markers (an independent reading), be
    far above the idle guest's, and above 50 % whenever the machine gave it
    the CPU (share of at least 60 %: on a busy 2-core machine two emulated
    vCPUs get much less, and the history must then say so, not 50 %).
    """
    out = e2e_run[0]
    _, markers = load_values(out)
    console = f"{FULL}-console.log"
    # Skip the first seconds (the busy processes start, the rate needs two samples).
    start = marker(markers, console, "E2E-BURN-START") + 5
    end = marker(markers, console, "E2E-BURN-END") - 1
    burner = window_stats(cpu_history(out / "history", FULL), start, end)
    idle = window_stats(cpu_history(out / "history", MINI), start, end)
    share = cpu_share(out, console, "E2E-BURN-START", "E2E-BURN-END", FULL)
    summary = {"window_s": round(end - start, 1), "burn_s": full["load"]["burned_s"],
               "libvirt_share": round(share, 1), FULL: burner, MINI: idle}
    (out / "values-summary.json").write_text(json.dumps(summary, indent=1))
    sys.stderr.write(f"\ne2e values: CPU % over the burn window {json.dumps(summary)}\n")
    # At least half the window known at every step the RRD gives.
    for got in (burner, idle):
        assert got["known"] >= (end - start) / got["step"] / 2, summary
    assert abs(burner["mean"] - share) <= 10 + 0.2 * share, summary
    assert idle["mean"] < IDLE_MAX_PCT and idle["max"] < IDLE_MAX_PCT, summary
    assert burner["mean"] > 3 * max(idle["max"], 1.0), summary
    if share >= 60:
        assert burner["mean"] > BURN_MIN_PCT, summary


def test_graph_is_a_png_of_the_requested_size(
    e2e_run: Tuple[Path, Dict[str, Any], Dict[str, float]]
) -> None:
    """vhostmdctl graph draws the burner's CPU % into a PNG of exactly WIDTH x HEIGHT."""
    out = e2e_run[0]
    png = out / "graph-full-cpu.png"
    png.unlink(missing_ok=True)
    proc = vhostmdctl(
        "--state-dir", str(out / "history"), "graph", "--vm", FULL, "--metric", "cpu",
        "--period", "day", "-o", str(png), "--width", "600", "--height", "200",
    )
    assert proc.returncode == 0, proc.stderr
    assert png_size(png) == (600, 200)


# --- per-VM policy: the full guest's domain metadata denies E2EPolicy*
# (virsh metadata --config before its start); at its end it is blocked by a
# live `virsh metadata` while the daemon runs ----------------------------------


def _policy_metrics(doc: bytes) -> Dict[Tuple[str | None, str | None], str | None]:
    """The E2EPolicy* metrics of a document: (name, uuid or None for the host) -> value."""
    return {(m["name"], m["uuid"]): m["value"] for m in _metrics(doc)
            if (m["name"] or "").startswith(POLICY_PREFIX)}


def _policy_state(out: Path, which: str) -> Dict[str, Any]:
    """policy.json (vhostmdctl policy's source) as the daemon had written it, by VM name."""
    state = json.loads((out / f"policy-{which}.json").read_text())
    return {v["name"]: v for v in state["vms"].values()}


def test_policy_metadata_set_with_virsh(
    e2e_run: Tuple[Path, Dict[str, Any], Dict[str, float]]
) -> None:
    """The full guest's policy is in its domain metadata, and the daemon took it from there."""
    out = e2e_run[0]
    # `virsh metadata DOMAIN --uri NS` prints the element of that namespace, without it.
    meta = etree.fromstring((out / f"{FULL}-metadata.xml").read_bytes())
    assert meta.tag == "policy" and [(d.tag, d.text) for d in meta] == [("deny", "E2EPolicy*")]
    before = _policy_state(out, "before")
    assert before[FULL]["deny"] == ["E2EPolicy*"] and before[FULL]["blocked"] is False
    assert before[FULL]["origin"]["deny"] == "metadata", before[FULL]
    assert before[MINI]["deny"] == [] and before[MINI]["blocked"] is False
    assert before[MINI]["origin"]["deny"] == "built-in", before[MINI]


def test_policy_denied_metric_hidden_from_full_guest(full: Dict[str, Any], e2e_run: Any) -> None:
    """Denied by its metadata: neither on the full guest's own disk nor over its virtio."""
    uuid = e2e_run[1][FULL]["uuid"]
    pervm, virtio = _stdout(full["pervm-dump-b"]), _stdout(full["dump-i"])
    for doc in (pervm, virtio):
        assert _policy_metrics(doc) == {}, doc
        # The rest of its view is intact (the other e2e tests check it in full).
        assert {m["name"] for m in _metrics(doc) if m["uuid"] == uuid} >= {"E2EIdent"}
        assert POLICY_PREFIX.encode() not in doc
    api = full["libmetrics"]
    for key in ("virtio:E2EPolicyHost:host", "virtio:E2EPolicyVm:vm",
                "disk:E2EPolicyHost:host", "disk:E2EPolicyVm:vm"):
        assert not api[key]["ok"] and "NotFound" in api[key]["error"], (key, api[key])
    own = full["pervm-libmetrics"]
    for key in ("E2EPolicyHost:host", "E2EPolicyVm:vm"):
        assert not own[key]["ok"] and "NotFound" in own[key]["error"], (key, own[key])
    assert own["E2EIdent:vm"]["ok"], own


def test_policy_other_guest_sees_the_metric(mini: Dict[str, Any], e2e_run: Any) -> None:
    """The mini guest, without a policy of its own, reads both on its own disk and over virtio."""
    uuid = e2e_run[1][MINI]["uuid"]
    want = {("E2EPolicyHost", None): "policy-host", ("E2EPolicyVm", uuid): f"policy-{MINI}"}
    assert _policy_metrics(mini["mini-pervm"]) == want
    assert _policy_metrics(mini["mini-virtio"]) == want


def test_policy_shared_disk_holds_what_every_vm_may_see(
    full: Dict[str, Any], mini: Dict[str, Any], e2e_run: Any
) -> None:
    """The shared disk: no host metric one VM is denied; each VM's block cut to its own view."""
    domains = e2e_run[1]
    want = {("E2EPolicyVm", domains[MINI]["uuid"]): f"policy-{MINI}"}
    for doc in (_stdout(full["dump-b"]), mini["mini-disk"]):
        assert _policy_metrics(doc) == want
        _assert_vm_block(doc, domains, FULL, FULL_VCPUS)
        _assert_host_metrics(doc)


def test_policy_block_by_live_metadata(
    full: Dict[str, Any], e2e_run: Tuple[Path, Dict[str, Any], Dict[str, float]]
) -> None:
    """virsh metadata --live blocks the full guest, the daemon running, within the refresh period.

    Its own disk then holds an empty document and virtio answers it the
    protocol's error (vm-dump-metrics -i fails); the daemon's policy.json
    says the block came from the metadata and the other VM's policy is
    unchanged. The time: from `virsh metadata` returning to the daemon's
    write of policy.json, and to the guest's line on its console (it reads
    its disk every half second).
    """
    out = e2e_run[0]
    rec = full["blocked"]
    assert base64.b64decode(rec["pervm_b64"]) == b"<metrics>\n</metrics>\n", rec
    replies = [base64.b64decode(r["b64"]) for r in rec["virtio"] if "b64" in r]
    assert replies and replies[-1] == b"INVALID REQUEST\n\n", rec["virtio"]
    # The first exchange after the block already gets the error.
    assert len(rec["virtio"]) == 1, rec["virtio"]
    dump = rec["dump-i"]
    assert dump["rc"] != 0 and _stdout(dump) == b"", dump
    assert "INVALID REQUEST" in dump["stderr"], dump
    after = _policy_state(out, "after")
    assert after[FULL]["blocked"] is True and after[FULL]["origin"]["blocked"] == "metadata"
    assert after[FULL]["deny"] == ["E2EPolicy*"]
    assert after[MINI]["blocked"] is False and after[MINI]["origin"]["blocked"] == "built-in"
    times = json.loads((out / "policy-block.json").read_text())
    refresh = times["refresh_s"]
    seen = times["guest_seen"] - times["set_at"]
    applied = times["policy_written"] - times["set_at"]
    sys.stderr.write(
        f"\ne2e policy: block applied by the daemon {applied:.2f} s and seen by the guest "
        f"{seen:.2f} s after virsh metadata --live returned (refresh period {refresh} s; "
        f"virsh itself took {times['set_at'] - times['set_start']:.2f} s)\n"
    )
    (out / "policy-summary.json").write_text(json.dumps(
        {"applied_s": applied, "seen_s": seen, "refresh_s": refresh}))
    # Written at most one cycle before virsh returned (the event can beat it).
    assert times["policy_written"] >= times["set_start"] - 1.0, times
    # Within the refresh period, plus the cycle that publishes it (1 s) and,
    # for the guest, its read every half second and the console's line.
    assert applied <= refresh + 1.0, times
    assert seen <= refresh + 3.0, times
    # One daemon throughout: it started once and was never restarted.
    log = (out / "daemon.log").read_text()
    assert log.count(" started (pid ") == 1, log[-3000:]
