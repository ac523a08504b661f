"""Accounting: scripted counters (resets, wraps, reboot, kill -9, period end), budgets, caps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import libvirt
import pytest
from helpers import REPO
from helpers.monitor import write_conf

from vhostmd_py.config import AccountingConfig, Budget, load_config
from vhostmd_py.errors import ConfigError
from vhostmd_py.monitors.accounting import Accounting, LibvirtShaper, period_start
from vhostmd_py.monitors.alarms import Alarm
from vhostmd_py.sources.stats import CycleStats, HostStats, NetStats, VmStats

A = "00000000-0000-4000-8000-00000000000a"
B = "00000000-0000-4000-8000-00000000000b"

Nics = Dict[str, Tuple[int, int]]  # dev -> (rx, tx)


def snap(wall: float, vms: Dict[str, Tuple[str, int, Nics]]) -> CycleStats:
    """A CycleStats with VMs uuid -> (name, domain id, {dev: (rx, tx)})."""
    return CycleStats(
        wall=wall, mono=wall, host=HostStats(),
        vms=tuple(
            VmStats(uuid=u, name=n, id=i,
                    nics=tuple(NetStats(d, rx_bytes=c[0], tx_bytes=c[1]) for d, c in nics.items()))
            for u, (n, i, nics) in vms.items()
        ),
    )


NO_BUDGET = Budget()


def cfg(tmp: Path, period: int = 100, budget: Budget = NO_BUDGET) -> AccountingConfig:
    return AccountingConfig(period=period, period_offset=0, state_dir=str(tmp),
                            guest_metrics=True, budget=budget, overrides=())


def used(acct: Accounting, uuid: str) -> Dict[str, Any]:
    entry = acct.state["vms"][uuid]
    return {"total": acct.totals(entry),
            "nics": {d: (n["rx"], n["tx"]) for d, n in entry["nics"].items()}}


def test_resets_restarts_hotplug_and_period_end_to_the_byte(tmp_path: Path) -> None:
    """Every counter event of the documented rule, hand-computed totals, then the period ends."""
    acct = Accounting(cfg(tmp_path), boot_id="boot-1")
    wrap = 2**32
    steps: List[Tuple[float, Dict[str, Tuple[str, int, Nics]]]] = [
        # first sight: a baseline, nothing counted
        (1000, {A: ("a", 1, {"vnet0": (500, 1000)}), B: ("b", 2, {"vnet9": (7, 7)})}),
        # +100 +500
        (1010, {A: ("a", 1, {"vnet0": (600, 1500)}), B: ("b", 2, {"vnet9": (17, 27)})}),
        # tx went down (reset): the new value counts from 0 -> +400
        (1020, {A: ("a", 1, {"vnet0": (wrap - 100, 400)})}),  # rx +(2**32-100-600); B absent
        (1030, {A: ("a", 1, {"vnet0": (50, 900)})}),  # rx wrapped: +50; tx +500
        # domain id changed (VM restarted): count from 0 even above the last value
        (1040, {A: ("a", 3, {"vnet0": (70, 2000)})}),  # rx +70, tx +2000
        # hot-plugged vnet1 counts from 0
        (1050, {A: ("a", 3, {"vnet0": (80, 2100), "vnet1": (5, 300)})}),
        (1060, {A: ("a", 3, {"vnet0": (90, 2200)})}),  # vnet1 unplugged: its usage stays
    ]
    for wall, vms in steps:
        acct.update(snap(wall, vms))
    rx0 = 100 + (wrap - 100 - 600) + 50 + 70 + 10 + 10
    tx0 = 500 + 400 + 500 + 2000 + 100 + 100
    assert used(acct, A) == {"total": {"rx": rx0 + 5, "tx": tx0 + 300},
                             "nics": {"vnet0": (rx0, tx0), "vnet1": (5, 300)}}
    assert used(acct, B)["total"] == {"rx": 10, "tx": 20}
    # The file on disk is the same state (atomic JSON).
    on_disk = json.loads((tmp_path / "accounting.json").read_text())
    assert on_disk["vms"][A]["nics"]["vnet0"]["tx"] == tx0
    # 1100 starts a new period: this sample's increment counts in the new one.
    acct.update(snap(1100, {A: ("a", 3, {"vnet0": (95, 2300)})}))
    previous = acct.state["previous"]
    assert (previous["period_start"], previous["period_end"]) == (1000, 1100)
    assert previous["vms"][A]["tx"] == tx0 + 300 and previous["vms"][B]["rx"] == 10
    assert B not in acct.state["vms"]  # gone at the period's end: dropped
    assert used(acct, A) == {"total": {"rx": 5, "tx": 100},
                             "nics": {"vnet0": (5, 100), "vnet1": (0, 0)}}
    assert acct.period_end() == 1200


def test_reboot_counts_new_counters_from_zero(tmp_path: Path) -> None:
    """After a reboot (new boot id) every counter restarted, even one above the stored value."""
    first = Accounting(cfg(tmp_path), boot_id="boot-1")
    first.update(snap(1000, {A: ("a", 1, {"vnet0": (0, 1000)})}))
    first.update(snap(1010, {A: ("a", 1, {"vnet0": (0, 1600)})}))  # +600
    again = Accounting(cfg(tmp_path), boot_id="boot-2")  # same domain id 1 after the reboot
    again.update(snap(1020, {A: ("a", 1, {"vnet0": (0, 5000)})}))  # +5000, not +3400
    again.update(snap(1030, {A: ("a", 1, {"vnet0": (0, 5500)})}))  # +500
    assert used(again, A)["total"]["tx"] == 600 + 5000 + 500
    # The same restart without a reboot continues from the stored counters.
    third = Accounting(cfg(tmp_path), boot_id="boot-2")
    third.update(snap(1040, {A: ("a", 1, {"vnet0": (0, 6000)})}))
    assert used(third, A)["total"]["tx"] == 6600


@pytest.mark.slow
def test_kill_9_between_state_writes_then_continue(tmp_path: Path) -> None:
    """A real process SIGKILLed mid-period; a new one continues from the state file, to the byte."""
    tx = [1000, 3000, 4500, 9000, 9100, 200, 700, 1700]  # a reset after step 4
    steps = [{"wall": 1000 + 10 * i, "vms": {A: {"name": "a", "id": 1,
                                                  "nics": {"vnet0": [i, t]}}}}
             for i, t in enumerate(tx)]
    steps.append({"wall": 1100, "vms": {A: {"name": "a", "id": 1, "nics": {"vnet0": [9, 2000]}}}})
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"period": 100, "steps": steps}))
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    script_path = REPO / "tests" / "helpers" / "accounting_driver.py"
    driver = [sys.executable, str(script_path), str(state), str(script)]
    with subprocess.Popen([*driver, "0", "7", "boot-1"], stdout=subprocess.PIPE, text=True,
                          env=env) as proc:  # closes the pipe, whatever happens
        assert proc.stdout is not None
        for expected in range(4):
            assert proc.stdout.readline().strip() == f"done {expected}"
        proc.send_signal(signal.SIGKILL)  # sleeping after the write of step 3
        assert proc.wait(10) == -signal.SIGKILL
    saved = json.loads((state / "accounting.json").read_text())
    assert saved["vms"][A]["nics"]["vnet0"]["tx"] == 2000 + 1500 + 4500
    assert not [p for p in state.iterdir() if p.name.startswith(".")]  # no temporaries left
    # The daemon was down for step 4; the new process starts at step 5 (after the reset).
    subprocess.run([*driver, "5", "8", "boot-1"], check=True, env=env, capture_output=True)
    final = json.loads((state / "accounting.json").read_text())
    period_total = 2000 + 1500 + 4500 + 200 + 500 + 1000  # step 4's +100 was lost by the reset
    assert final["previous"]["vms"][A]["tx"] == period_total
    assert final["vms"][A]["nics"]["vnet0"]["tx"] == 300  # 1700 -> 2000 in the new period


def test_damaged_state_file_is_set_aside(tmp_path: Path) -> None:
    """Unparsable state: accounting restarts (baseline) and keeps the bad file for a human."""
    (tmp_path / "accounting.json").write_text("{not json")
    acct = Accounting(cfg(tmp_path), boot_id="b")
    acct.update(snap(1000, {A: ("a", 1, {"vnet0": (1, 1)})}))
    assert (tmp_path / "accounting.json.bad").read_text() == "{not json"
    assert used(acct, A)["total"] == {"rx": 0, "tx": 0}


def test_period_alignment() -> None:
    """Periods start at offset + k * period since the epoch."""
    assert period_start(86400 * 3 + 5, 86400, 0) == 86400 * 3
    assert period_start(86400 * 3 + 5, 86400, 3600) == 86400 * 2 + 3600


# --- budgets and enforcement against libvirt's test driver -------------------------

NODE = """<node>
  <cpu><mhz>2000</mhz><model>i686</model><active>2</active><nodes>1</nodes>
    <sockets>1</sockets><cores>2</cores><threads>1</threads></cpu>
  <memory>16777216</memory>
  <domain type='test'>
    <name>capped</name>
    <uuid>{uuid}</uuid>
    <memory unit='KiB'>1048576</memory><vcpu>1</vcpu>
    <os><type arch='x86_64'>hvm</type></os>
    <devices>
      <interface type='network'><source network='default'/>
        <mac address='52:54:00:00:00:01'/>
        <bandwidth><inbound average='300' peak='400' burst='64'/>
          {outbound}</bandwidth>
      </interface>
    </devices>
  </domain>
</node>
"""


OUTBOUND = "<outbound average='1000' peak='2000' burst='512'/>"


def _test_conn(tmp_path: Path, outbound: str = OUTBOUND) -> Tuple[Any, str]:
    node = tmp_path / "node.xml"
    node.write_text(NODE.format(uuid=A, outbound=outbound))
    conn = libvirt.open(f"test://{node}")
    dev = conn.lookupByUUIDString(A).XMLDesc(0).split("<target dev='")[1].split("'")[0]
    return conn, dev


def test_budget_caps_then_restores_exactly(tmp_path: Path) -> None:
    """Over budget: one alarm, outbound capped to the average; period end: originals back."""
    conn, dev = _test_conn(tmp_path)
    dom = conn.lookupByUUIDString(A)
    original = dom.interfaceParameters(dev, 0)
    alarms: List[Alarm] = []
    budget = Budget(tx=100 * 1024 * 100, rx=None, enforce=True)  # 100 KiB/s over 100 s
    acct = Accounting(cfg(tmp_path, budget=budget), shaper=LibvirtShaper(None, conn=conn),
                      on_alarm=alarms.append, boot_id="b")
    acct.update(snap(1000, {A: ("capped", 1, {dev: (0, 0)})}))
    acct.update(snap(1010, {A: ("capped", 1, {dev: (0, budget.tx - 1)})}))
    assert alarms == [] and dom.interfaceParameters(dev, 0) == original
    acct.update(snap(1020, {A: ("capped", 1, {dev: (0, budget.tx)})}))
    assert [a.variable for a in alarms] == ["net_tx_budget"]
    now = dom.interfaceParameters(dev, 0)
    assert (now["outbound.average"], now["outbound.peak"]) == (100, 100)
    assert now["outbound.burst"] == original["outbound.burst"]
    saved = json.loads((tmp_path / "accounting.json").read_text())
    assert saved["vms"][A]["capped"][dev] == original  # stored before changing anything
    assert [m.value for m in acct.guest_metrics(A) if m.name == "AccountingCapped"] == ["1"]
    acct.update(snap(1030, {A: ("capped", 1, {dev: (0, budget.tx * 2)})}))
    assert len(alarms) == 1  # once per period
    # A restarted daemon (new object, same state file) restores at the period's end.
    again = Accounting(cfg(tmp_path, budget=budget), shaper=LibvirtShaper(None, conn=conn),
                       on_alarm=alarms.append, boot_id="b")
    again.update(snap(1100, {A: ("capped", 1, {dev: (0, budget.tx * 2 + 10)})}))
    back = dom.interfaceParameters(dev, 0)
    assert {k: back[k] for k in back if k.startswith("outbound")} == {
        k: original[k] for k in original if k.startswith("outbound")}
    assert again.state["restore"] == [] and "capped" not in again.state["vms"][A]
    assert used(again, A)["total"]["tx"] == 10


def _over_budget(tmp_path: Path, outbound: str, cap_kib: int) -> Tuple[Any, str, Accounting]:
    """A VM whose interface has OUTBOUND, driven over a budget whose cap is CAP_KIB KiB/s."""
    conn, dev = _test_conn(tmp_path, outbound)
    budget = Budget(tx=cap_kib * 1024 * 100, enforce=True)  # over the 100 s period
    acct = Accounting(cfg(tmp_path, budget=budget), shaper=LibvirtShaper(None, conn=conn),
                      boot_id="b")
    acct.update(snap(1000, {A: ("capped", 1, {dev: (0, 0)})}))
    acct.update(snap(1010, {A: ("capped", 1, {dev: (0, budget.tx or 0)})}))
    return conn.lookupByUUIDString(A), dev, acct


def _outbound(dom: Any, dev: str) -> Dict[str, int]:
    return {k[9:]: v for k, v in dom.interfaceParameters(dev, 0).items()
            if k.startswith("outbound.")}


def test_budget_never_raises_an_existing_lower_limit(tmp_path: Path) -> None:
    """A cap above the average already set leaves the interface exactly as it was."""
    dom, dev, acct = _over_budget(tmp_path, OUTBOUND, cap_kib=10**6)
    assert _outbound(dom, dev) == {"average": 1000, "peak": 2000, "burst": 512}
    assert acct.state["vms"][A]["capped"] == {}  # nothing changed: nothing to restore
    assert [m.value for m in acct.guest_metrics(A) if m.name == "AccountingCapped"] == ["0"]


def test_cap_leaves_an_average_within_it_alone_even_with_a_higher_peak(tmp_path: Path) -> None:
    """bwmon leaves a slice already within the limit alone: the peak above the cap stays."""
    dom, dev, acct = _over_budget(
        tmp_path, "<outbound average='50' peak='2000' burst='512'/>", cap_kib=100)
    assert _outbound(dom, dev) == {"average": 50, "peak": 2000, "burst": 512}
    assert acct.state["restore"] == [] and acct.state["vms"][A]["capped"] == {}


def test_cap_lowers_only_what_exceeds_it(tmp_path: Path) -> None:
    """Average above the cap and peak below it: only the average changes; then restored."""
    dom, dev, acct = _over_budget(
        tmp_path, "<outbound average='1000' peak='80' burst='512'/>", cap_kib=100)
    assert _outbound(dom, dev) == {"average": 100, "peak": 80, "burst": 512}
    acct.update(snap(1100, {A: ("capped", 1, {dev: (0, 1)})}))  # the period ends
    assert _outbound(dom, dev) == {"average": 1000, "peak": 80, "burst": 512}


def test_cap_on_an_unlimited_interface_sets_the_average_only(tmp_path: Path) -> None:
    """No limit set: the average becomes the cap, the peak stays unset (bursts at the cap)."""
    dom, dev, acct = _over_budget(tmp_path, "", cap_kib=100)
    assert _outbound(dom, dev) == {"average": 100, "peak": 0, "burst": 0}
    acct.update(snap(1100, {A: ("capped", 1, {dev: (0, 1)})}))
    assert _outbound(dom, dev) == {"average": 0, "peak": 0, "burst": 0}


def test_accounting_config_and_overrides(tmp_path: Path) -> None:
    """Sizes, durations, per-VM overrides (uuid before name), errors with lines."""
    conf = write_conf(tmp_path / "c.xml", f"""  <accounting period="12h" state_dir="{tmp_path}">
    <budget tx="10G" rx="512M" enforce="yes"/>
    <vm name="small"><budget tx="1M"/></vm>
    <vm uuid="{B}"><budget tx="none" enforce="no"/></vm>
  </accounting>
""")
    acc = load_config(conf).accounting
    assert acc is not None and acc.period == 43200
    assert acc.budget_for(A, "other") == Budget(10 * 1024**3, 512 * 1024**2, True)
    assert acc.budget_for(A, "small") == Budget(1024**2, 512 * 1024**2, True)
    assert acc.budget_for(B, "small") == Budget(None, 512 * 1024**2, False)
    section = '  <accounting>\n    <budget tx="lots"/>\n  </accounting>\n'
    bad = write_conf(tmp_path / "bad.xml", section)
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.line == bad.read_text().splitlines().index('    <budget tx="lots"/>') + 1


def test_vhostmdctl_usage(tmp_path: Path) -> None:
    """vhostmdctl usage shows the state file's usage, budget and period end."""
    acct = Accounting(cfg(tmp_path, budget=Budget(tx=5000)), boot_id="b")
    acct.update(snap(1000, {A: ("a", 1, {"vnet0": (0, 0)}), B: ("b", 2, {"vnet0": (0, 0)})}))
    acct.update(snap(1010, {A: ("a", 1, {"vnet0": (123, 456)}), B: ("b", 2, {"vnet0": (1, 2)})}))
    ctl = [sys.executable, "-m", "vhostmd_py.ctl.main", "usage", "--state-dir", str(tmp_path)]
    out = subprocess.run([*ctl, "--vm", "a", "--format", "json"], capture_output=True, text=True,
                         check=True)
    data = json.loads(out.stdout)
    assert data["period_end"] == 1100
    assert [(v["name"], v["rx"], v["tx"], v["budget_tx"]) for v in data["vms"]] == [
        ("a", 123, 456, 5000)]
    text = subprocess.run(ctl, capture_output=True, text=True, check=True).stdout
    assert text.splitlines()[2].split() == ["a", "456", "5000", "123", "-", "no"]
    missing = subprocess.run([*ctl, "--vm", "zzz"], capture_output=True, text=True)
    assert missing.returncode == 1 and "no accounting for zzz" in missing.stderr


def test_guest_metrics_through_the_daemon(tmp_path: Path) -> None:
    """<accounting guest_metrics="yes">: the VM's own block carries its usage and budget."""
    import asyncio

    from helpers.monitor import ScriptedSource, fast_clock

    from vhostmd_py.cycle.render import document, parse_document
    from vhostmd_py.daemon import Daemon
    from vhostmd_py.sources.shell.runner import ActionRunner

    conf = write_conf(tmp_path / "c.xml", f"""  <accounting period="1d" state_dir="{tmp_path}"
      guest_metrics="yes"><budget tx="1M"/></accounting>
""")
    # tx 1000 B/s for 3 cycles of 10 s after the baseline: 30000 bytes.
    source = ScriptedSource([{"test": (0.0, 0.0)}] + [{"test": (0.0, 1000.0)}] * 3,
                            start=86400 * 100 + 60)
    config = load_config(conf)
    daemon = Daemon(config, uri="test:///default",
                    runner_factory=lambda c: ActionRunner(path=c.path, uri="test:///default"),
                    clock=fast_clock(), publish=False, stats_source=source)
    asyncio.run(daemon.run(max_cycles=4, signals=False))
    assert daemon.last_snapshot is not None
    doc = parse_document(document(daemon.last_snapshot))
    got = {m.findtext("name"): (m.get("type"), m.findtext("value")) for m in doc.iter("metric")}
    assert got["AccountingTxBytes"] == ("uint64", "30000")
    assert got["AccountingTxBudget"] == ("uint64", str(1024**2))
    assert got["AccountingPeriodEnd"] == ("uint64", str(86400 * 101))
    assert got["AccountingCapped"] == ("uint32", "0")
