"""Consolidated values published to guests as ordinary ``<metric>`` elements.

With ``<history publish="yes"/>`` every cycle's document gets these metrics
(upstream's layout, rendered by vhostmd_py.cycle.render.render_metric), so a guest
reads them with vm-dump-metrics or libmetrics like any other metric. A value
that is unknown this cycle (first sample, counter reset, gap, too little data
in the window) is left out, never published as zero.

Host metrics (context host):

=========================  ======  ====  ===============================================
name                       type    unit  value
=========================  ======  ====  ===============================================
HostCPUUtilization         real64  %     busy share of all CPUs over the last period
HostCPUUtilization1m       real64  %     the same, time-weighted average of the last 60 s
HostCPUUtilization5m       real64  %     the same over the last 300 s
=========================  ======  ====  ===============================================

VM metrics (context vm, one set per VM):

=========================  ======  =======  ==========================================
VMCPUUtilization           real64  %        CPU time / (period x vCPUs), capped at 100
VMCPUUtilization1m         real64  %        time-weighted average of the last 60 s
VMCPUUtilization5m         real64  %        over the last 300 s
VMNetRxRate                real64  bytes/s  received, all interfaces, last period
VMNetTxRate                real64  bytes/s  sent, all interfaces, last period
VMDiskReadRate             real64  bytes/s  read, all disks, last period
VMDiskWriteRate            real64  bytes/s  written, all disks, last period
=========================  ======  =======  ==========================================

Values are printed with two decimals (``12.50``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from vhostmd_py.cycle.render import ExtraMetric, append_metrics
from vhostmd_py.cycle.snapshot import Snapshot, VmBlock
from vhostmd_py.history.rates import DerivedValues
from vhostmd_py.sources.vm import VM

Averager = Callable[[str, float], Optional[float]]


# One published metric (render.append_metrics renders it).
PublishedMetric = ExtraMetric


def _fmt(value: float) -> str:
    return f"{value:.2f}"


def _items(specs: Sequence[Tuple[str, str, float | None]]) -> List[PublishedMetric]:
    return [
        PublishedMetric(name, "real64", unit, _fmt(value))
        for name, unit, value in specs
        if value is not None
    ]


def published_metrics(
    derived: DerivedValues, average: Averager
) -> Tuple[List[PublishedMetric], Dict[str, List[PublishedMetric]]]:
    """The host's metrics and each VM's (by UUID); ``average(key, window)`` consolidates."""
    host = _items(
        [
            ("HostCPUUtilization", "%", derived.host.cpu_pct),
            ("HostCPUUtilization1m", "%", average("host", 60.0)),
            ("HostCPUUtilization5m", "%", average("host", 300.0)),
        ]
    )
    vms: Dict[str, List[PublishedMetric]] = {}
    for vm in derived.vms:
        vms[vm.uuid] = _items(
            [
                ("VMCPUUtilization", "%", vm.cpu_pct),
                ("VMCPUUtilization1m", "%", average(vm.uuid, 60.0)),
                ("VMCPUUtilization5m", "%", average(vm.uuid, 300.0)),
                ("VMNetRxRate", "bytes/s", vm.net_rx_bytes),
                ("VMNetTxRate", "bytes/s", vm.net_tx_bytes),
                ("VMDiskReadRate", "bytes/s", vm.disk_rd_bytes),
                ("VMDiskWriteRate", "bytes/s", vm.disk_wr_bytes),
            ]
        )
    return host, vms


def decorate(
    snapshot: Snapshot,
    host: Sequence[PublishedMetric],
    vms: Mapping[str, Sequence[PublishedMetric]],
    derived: DerivedValues | None = None,
) -> Snapshot:
    """The snapshot with these metrics appended to the host part and to each VM's block.

    A VM of ``derived`` the snapshot has no block for (no vm metrics in the
    config) gets a block of its own, after the others.
    """
    known = {b.vm.uuid for b in snapshot.vms}
    missing = tuple(
        VmBlock(VM(r.id, r.name, r.uuid), b"")
        for r in (derived.vms if derived is not None else ())
        if r.uuid not in known and vms.get(r.uuid)
    )
    return append_metrics(replace(snapshot, vms=snapshot.vms + missing), host, vms)
