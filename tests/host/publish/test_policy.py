"""What each VM may see of a snapshot: per-VM disks and virtio, the shared disk."""

from __future__ import annotations

from vhostmd_py.config.records import PolicyConfig, Rule
from vhostmd_py.cycle.render import render_metric
from vhostmd_py.cycle.snapshot import Snapshot, VmBlock
from vhostmd_py.publish.policy import PolicyView, elements
from vhostmd_py.sources.metadata import DomainPolicy
from vhostmd_py.sources.vm import VM

A = VM(id=1, name="a", uuid="aaaaaaaa-0000-0000-0000-000000000001")
B = VM(id=2, name="b", uuid="aaaaaaaa-0000-0000-0000-000000000002")


def _m(name: str, vm: VM | None = None) -> bytes:
    return render_metric("uint64", name, b"1", vm, None)


SNAP = Snapshot(
    host=_m("HostName") + _m("TotalCPUs") + _m("Time"),
    vms=(VmBlock(A, _m("VCpus", A) + _m("Net.vda", A)), VmBlock(B, _m("VCpus", B))),
)


def names(xml: bytes) -> list:
    return [n for n, _ in elements(xml)]


class Book:
    def __init__(self, policies: dict) -> None:
        self.policies = policies

    def policy(self, uuid: str) -> DomainPolicy | None:
        return self.policies.get(uuid)


def test_elements_split_the_rendered_bytes() -> None:
    assert names(SNAP.host) == ["HostName", "TotalCPUs", "Time"]
    assert b"".join(raw for _, raw in elements(SNAP.host)) == SNAP.host


def test_no_rule_everything_as_upstream() -> None:
    view = PolicyView(PolicyConfig())
    assert view.shared(SNAP) == SNAP
    got = view.for_vm(SNAP, A)
    assert got is not None and got.host == SNAP.host and got.vms == (SNAP.vms[0],)


def test_per_vm_view_allow_deny_own_block_only() -> None:
    view = PolicyView(PolicyConfig(default=Rule(deny=("HostName",)),
                                   by_name={"a": Rule(allow=("Total*", "VCpus", "Net"))}))
    a = view.for_vm(SNAP, A)
    assert a is not None
    assert names(a.host) == ["TotalCPUs"]  # a's own allow list; default's deny too
    assert [b.vm for b in a.vms] == [A] and names(a.vms[0].xml) == ["VCpus", "Net.vda"]
    b = view.for_vm(SNAP, B)
    assert b is not None and names(b.host) == ["TotalCPUs", "Time"]
    assert [blk.vm for blk in b.vms] == [B]


def test_blocked_vm_gets_nothing() -> None:
    view = PolicyView(PolicyConfig(by_uuid={B.uuid: Rule(blocked=True)}))
    assert view.for_vm(SNAP, B) is None
    # On the shared disk: B's block is gone, and the host part is what every
    # running VM may see: B sees nothing, so nothing.
    shared = view.shared(SNAP)
    assert shared.host == b"" and [blk.vm for blk in shared.vms] == [A]


def test_shared_disk_holds_what_every_vm_may_see() -> None:
    book = Book({A.uuid: DomainPolicy(rule=Rule(deny=("Time",), shared=False))})
    view = PolicyView(PolicyConfig(default=Rule(deny=("HostName",))), book)  # type: ignore[arg-type]
    shared = view.shared(SNAP)
    assert names(shared.host) == ["TotalCPUs"]
    assert [blk.vm for blk in shared.vms] == [B]  # A's block is not shared
    # A's own deny list replaces the default's (its own rule is its own).
    a = view.for_vm(SNAP, A)
    assert a is not None and names(a.host) == ["HostName", "TotalCPUs"] and a.vms[0].vm == A


def test_config_rule_is_final_over_metadata() -> None:
    book = Book({A.uuid: DomainPolicy(rule=Rule(blocked=False, allow=("Time",)))})
    view = PolicyView(PolicyConfig(by_name={"a": Rule(blocked=True)}), book)  # type: ignore[arg-type]
    policy = view.effective(A)
    assert policy.blocked is True and policy.origin["blocked"] == "config policy_vm name=a"
    assert policy.allow == () and policy.origin["allow"] == "built-in"
    table = view.table([A])
    assert table[A.uuid]["blocked"] is True and table[A.uuid]["name"] == "a"


def test_metadata_off_ignores_domains() -> None:
    book = Book({A.uuid: DomainPolicy(rule=Rule(blocked=True))})
    view = PolicyView(PolicyConfig(metadata=False), book)  # type: ignore[arg-type]
    assert view.for_vm(SNAP, A) is not None
