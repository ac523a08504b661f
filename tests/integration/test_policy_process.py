"""Per-VM policy through a real daemon: vhostmd.conf rules and domains' own libvirt metadata.

libvirt's test driver reads tests/data/nodes/node-policy.xml, whose domains
carry vhostmd-py's metadata (none, a deny, blocked, not shared, two broken
ones, another namespace). Per-VM disks and the shared disk are read back
with the guest's own reader.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from helpers import REPO
from helpers.config import write_config
from helpers.daemon import Vhostmd, metrics_of, try_read, wait_for
from vhostmd_wire.disk import read_disk

NODE = REPO / "tests" / "data" / "nodes" / "node-policy.xml"
UUID = "00000000-0000-4000-8000-00000000010{}"
EMPTY = b'<metrics>\n</metrics>\n'


def _names(doc: bytes) -> Dict[str, List[str]]:
    """{'host' or VM id: [metric names]} of a document."""
    out: Dict[str, List[str]] = {}
    for (name, where), _ in metrics_of(doc).items():
        out.setdefault(where, []).append(name)
    return {k: sorted(v) for k, v in out.items()}


def _vhostmdctl(*args: str) -> str:
    return subprocess.run([sys.executable, "-c", "from vhostmd_py.ctl.main import main; main()",
                           *args], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(REPO)}).stdout


def test_policy_from_config_and_metadata_on_per_vm_and_shared_disks(tmp_path: Path) -> None:
    pervm = tmp_path / "pervm"
    pervm.mkdir()
    state = tmp_path / "state"
    disk = tmp_path / "vhostmd0"
    conf = write_config(
        tmp_path / "vhostmd.conf", disk,
        [("HostName", "string", "host", "echo hv1"),
         ("SecretHost", "string", "host", "echo s3cr3t"),
         ("Free", "uint64", "host", "echo 42"),
         ("VCpus", "uint32", "vm", "echo 2"),
         ("SecretVM", "uint32", "vm", "echo 9")],
        size=256, extra=f'<disk_per_vm path="{pervm}/%u"/>',
        after_metrics=(f'<policy state_dir="{state}"><policy_default><deny>HostName</deny>'
                       '</policy_default>\n'
                       '<policy_vm name="pol1"><allow>Free</allow><allow>VCpus</allow>'
                       '</policy_vm></policy>\n'),
    )
    daemon = Vhostmd(["-d", "-f", str(conf), "-c", f"test://{NODE}"], tmp_path)
    try:
        for n in range(1, 8):
            wait_for(lambda n=n: (pervm / UUID.format(n)).exists()
                     and try_read(pervm / UUID.format(n)) is not None, 15, f"pol{n}'s disk")
        wait_for(lambda: (state / "policy.json").exists(), 10, "policy.json")
        docs = {n: read_disk(pervm / UUID.format(n)) for n in range(1, 8)}
        shared = read_disk(disk)
        ctl = _vhostmdctl("policy", "--state-dir", str(state), "--format", "json")
        text = _vhostmdctl("--state-dir", str(state), "policy", "--vm", "pol3")
    finally:
        daemon.close()
    # pol1: its <policy_vm> allow list (the file is final).
    assert _names(docs[1]) == {"host": ["Free"], "1": ["VCpus"]}
    # pol2: its metadata denies Secret*; the default's deny is replaced by its own.
    assert _names(docs[2]) == {"host": ["Free", "HostName"], "2": ["VCpus"]}
    # pol3: blocked by its metadata: an empty document.
    assert docs[3] == EMPTY
    # pol4 (not shared), pol5 and pol6 (broken metadata, ignored: the default), pol7 (another
    # namespace: no policy of ours): the default rule.
    for n in (4, 5, 6, 7):
        assert _names(docs[n]) == {"host": ["Free", "SecretHost"], str(n): ["SecretVM", "VCpus"]}
    # Never another VM's block on a VM's own disk.
    for n, doc in docs.items():
        assert set(_names(doc)) <= {"host", str(n)}
    # The shared disk: host metrics every VM may see (pol3 sees none: none), the blocks of
    # shared, unblocked VMs, each cut to what that VM may see of its own.
    got = _names(shared)
    assert "host" not in got
    assert set(got) == {"1", "2", "5", "6", "7"}
    assert got["1"] == ["VCpus"] and got["2"] == ["VCpus"]
    # The log names each broken domain once; the daemon went on.
    log = daemon.log()
    assert log.count("policy in the metadata of VM 'pol5'") == 1
    assert log.count("policy in the metadata of VM 'pol6'") == 1
    assert "levels deep" in log and "expected yes or no" in log
    # vhostmdctl policy: effective policies and their origins.
    table = {row["name"]: row for row in json.loads(ctl)["vms"]}
    assert table["pol3"]["blocked"] is True and table["pol3"]["origin"]["blocked"] == "metadata"
    assert table["pol1"]["origin"]["allow"] == "config policy_vm name=pol1"
    assert table["pol4"]["shared"] is False and table["pol4"]["origin"]["shared"] == "metadata"
    assert table["pol5"]["origin"]["deny"] == "config policy_default"
    assert "blocked  yes    from metadata" in text
