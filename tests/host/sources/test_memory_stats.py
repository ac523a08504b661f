"""Every memory statistic libvirt reports can be published, named as nova does (memory-KEY)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Dict

import libvirt
from helpers import REPO
from helpers.config import write_config
from helpers.daemon import metrics_of

from vhostmd_py.sources.builtin.catalogue import CATALOGUE, lookup
from vhostmd_py.sources.builtin.domstats import _bulk_balloon

# virsh domstats --balloon: balloon.current and balloon.maximum, then one
# balloon.KEY per memory statistic (libvirt's VIR_DOMAIN_MEMORY_STAT_*, the
# bulk call spelling last_update "last-update").
_NOT_KEYS = {"LAST", "NR", "ACTUAL_BALLOON"}
STAT_KEYS = sorted(
    ["actual"]
    + [n[len("VIR_DOMAIN_MEMORY_STAT_"):].lower() for n in dir(libvirt)
       if n.startswith("VIR_DOMAIN_MEMORY_STAT_") and n[len("VIR_DOMAIN_MEMORY_STAT_"):]
       not in _NOT_KEYS]
)
DOMSTATS_KEYS = ["balloon.current", "balloon.maximum"] + [
    "balloon." + ("last-update" if k == "last_update" else k) for k in STAT_KEYS if k != "actual"
]


def test_every_domstats_balloon_key_has_a_field() -> None:
    """Each key of ``virsh domstats --balloon`` maps to a catalogue field with a meaning."""
    record = {key: 1000 + i for i, key in enumerate(DOMSTATS_KEYS)}
    parsed = _bulk_balloon(record)
    fields: Dict[str, str] = {"balloon.current": "vm.memory_kib",
                              "balloon.maximum": "vm.memory_max_kib"}
    for key in DOMSTATS_KEYS[2:]:
        stat = key[len("balloon."):].replace("-", "_")
        assert parsed[stat] == record[key]
        fields[key] = f"vm.balloon.{stat}"
    assert "hugetlb_pgalloc" in parsed and "hugetlb_pgfail" in parsed
    for key, name in fields.items():
        assert name in CATALOGUE, key  # listed, with a documented meaning
    # A key newer than the list is a field too, made when the config names it.
    future = lookup("vm.balloon.some_future_key")
    assert future is not None and future.needs == frozenset({"balloon"})
    assert lookup("vm.balloon.Bad Key") is None


def test_every_reported_key_published_as_nova_names_it(tmp_path: Path) -> None:
    """The daemon (--dump, test driver) publishes memory-KEY for every key virsh reports."""
    conf = write_config(tmp_path / "c.xml", tmp_path / "disk", [
        '    <metric type="uint64" context="vm"><name>memory-{dev}</name>'
        "<source>vm.balloon</source></metric>\n",
        '    <metric type="uint64" context="vm"><name>pgfail</name>'
        "<source>vm.balloon.hugetlb_pgfail</source></metric>\n",
    ])
    out = subprocess.run(
        [sys.executable, "-c", "from vhostmd_py.cli import main; main()", "--dump", "-f",
         str(conf), "-c", "test:///default"],
        capture_output=True, check=True, cwd=REPO,
    ).stdout
    published = {name: value for (name, _), value in metrics_of(out).items()}
    virsh = subprocess.run(["virsh", "-c", "test:///default", "dommemstat", "test"],
                           capture_output=True, text=True, check=True).stdout
    reported = dict(line.split() for line in virsh.splitlines() if line.strip())
    assert {"hugetlb_pgalloc", "hugetlb_pgfail"} <= set(reported)
    assert {f"memory-{k}": v for k, v in reported.items()} == {
        k: v for k, v in published.items() if k.startswith("memory-")}
    assert published["pgfail"] == reported["hugetlb_pgfail"]
