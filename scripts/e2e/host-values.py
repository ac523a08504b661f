"""Independent readings next to the published built-in values (e2e).

Run on the host by scripts/e2e-guest (scripts/e2e/values.sh) while the guests
run, with the daemon's interpreter (libvirt-python, vhostmd_wire). Each
sample is, in this order:

1. reading A: libvirt's bulk statistics asked by this separate client
   (virConnectGetAllDomainStats: cpu.time, vcpu.current, balloon.maximum,
   block.N.*), and the PER-DOMAIN calls too (virDomainGetInfo,
   virDomainBlockStats on the disks of the domain XML), plus virNodeGetInfo
   and /proc/meminfo;
2. wait until the metrics disk's header changed twice (two publications after
   A: the second one's values were sampled in a cycle that began after the
   first one, so after A);
3. a stable read of the metrics disk (vhostmd_wire's reader);
4. reading B, as A.

So A <= published <= B must hold for every counter of the bulk reading, with
no tolerance. virDomainGetInfo's CPU time is another clock (QEMU process
ticks from /proc, USER_HZ resolution, where the bulk call reads the cgroup's
nanoseconds): the test allows it two ticks (clk_tck is recorded).
Once the burn has begun, one more sample is taken and then only the console
is watched, so that sampling does not compete with the burning guest. The
guest's console markers (E2E-READ-*, E2E-BURN-*) are timestamped with the
host's clock as they appear, for the CPU % window. One JSON object per line
in OUT, flushed as written (the script stops this process with SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import sys
import time
from typing import Any, Dict, List, Tuple

import libvirt
from lxml import etree
from vhostmd_wire.disk import read_disk

MARKERS = ("E2E-READ-START", "E2E-READ-END", "E2E-BURN-START", "E2E-BURN-END")
STOP = False


def _stop(_sig: int, _frame: Any) -> None:
    global STOP
    STOP = True


class Sampler:
    """Readings of the named domains and of the metrics disk."""

    def __init__(self, uri: str, disk: str, names: List[str], consoles: List[str]) -> None:
        self.conn = libvirt.open(uri)
        self.disk = disk
        self.names = names
        self.consoles = {c: 0 for c in consoles}
        self.seen: Dict[str, float] = {}
        self.devices: Dict[str, Tuple[str, ...]] = {}
        self.records: List[Dict[str, Any]] = []

    def poll_consoles(self) -> None:
        """Timestamp each marker line of the consoles the first time it appears."""
        for path, offset in self.consoles.items():
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            # Only whole lines: a marker cut by a half-written line is seen next time.
            end = data.rfind(b"\n") + 1
            self.consoles[path] = offset + end
            for line in data[:end].decode(errors="replace").splitlines():
                for marker in MARKERS:
                    key = f"{os.path.basename(path)}:{marker}"
                    if marker in line and key not in self.seen:
                        self.seen[key] = time.time()
                        self.records.append({"kind": "marker", "key": key, "wall": self.seen[key],
                                             "cpu": self.cpu_times()})

    def cpu_times(self) -> Dict[str, Dict[str, int]]:
        """Each running domain's CPU time (ns, the bulk call) and vCPUs: one cheap call.

        Taken with each console marker, so the test knows how much CPU the
        guests really got between two markers, whatever the machine's load."""
        try:
            stats = self.conn.getAllDomainStats(
                stats=libvirt.VIR_DOMAIN_STATS_CPU_TOTAL | libvirt.VIR_DOMAIN_STATS_VCPU,
                flags=libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE,
            )
        except libvirt.libvirtError:
            return {}
        return {dom.name(): {"cpu_time": int(rec["cpu.time"]), "vcpus": int(rec["vcpu.current"])}
                for dom, rec in stats}

    def _disks(self, name: str, dom: Any) -> Tuple[str, ...]:
        if name not in self.devices:
            root = etree.fromstring(dom.XMLDesc(0).encode())
            self.devices[name] = tuple(
                str(t.get("dev")) for t in root.iterfind("devices/disk/target")
            )
        return self.devices[name]

    def reading(self) -> Dict[str, Any]:
        """Per-domain libvirt calls for each running domain, node info, /proc/meminfo."""
        out: Dict[str, Any] = {
            "wall": time.time(), "domains": {}, "clk_tck": os.sysconf("SC_CLK_TCK")
        }
        bulk = {}
        for dom, rec in self.conn.getAllDomainStats(
            stats=libvirt.VIR_DOMAIN_STATS_CPU_TOTAL | libvirt.VIR_DOMAIN_STATS_VCPU
            | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_BLOCK,
            flags=libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE,
        ):
            disks = {}
            for i in range(int(rec.get("block.count", 0))):
                disks[rec[f"block.{i}.name"]] = {
                    "rd_req": int(rec.get(f"block.{i}.rd.reqs", -1)),
                    "rd_bytes": int(rec.get(f"block.{i}.rd.bytes", -1)),
                }
            bulk[dom.name()] = {
                "cpu_time": int(rec["cpu.time"]),
                "vcpus": int(rec["vcpu.current"]),
                "max_kib": int(rec["balloon.maximum"]),
                "disks": disks,
            }
        info = self.conn.getInfo()
        out["node_cpus"] = int(info[2])
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    out["mem_total_kib"] = int(line.split()[1])
        for name in self.names:
            try:
                dom = self.conn.lookupByName(name)
                if not dom.isActive():
                    continue
                state, max_kib, _cur, vcpus, cpu_time = dom.info()
                disks = {}
                for dev in self._disks(name, dom):
                    rd_req, rd_bytes = dom.blockStats(dev)[:2]
                    disks[dev] = {"rd_req": int(rd_req), "rd_bytes": int(rd_bytes)}
            except libvirt.libvirtError:
                continue  # stopped meanwhile
            out["domains"][name] = {
                "uuid": dom.UUIDString(),
                "id": dom.ID(),
                "state": int(state),
                "max_kib": int(max_kib),
                "vcpus": int(vcpus),
                "cpu_time": int(cpu_time),
                "disks": disks,
                "bulk": bulk.get(name),
            }
        return out

    def header(self) -> Tuple[int, int, int]:
        """(busy, checksum, length) of the metrics disk."""
        with open(self.disk, "rb") as f:
            _sig, busy, csum, length = struct.unpack(">IIII", f.read(16))
        return busy, csum, length

    def wait_publications(self, count: int, timeout: float) -> int:
        """Wait for COUNT changes of the published header; how many were seen."""
        deadline = time.monotonic() + timeout
        last = self.header()
        seen = 0
        while seen < count and time.monotonic() < deadline and not STOP:
            time.sleep(0.02)
            self.poll_consoles()
            now = self.header()
            if now[0] == 0 and now != last:
                seen += 1
                last = now
        return seen

    def document(self) -> Dict[str, Any]:
        """The E2ENative* metrics of the published document, host and per VM UUID."""
        doc = read_disk(self.disk, direct=False)
        root = etree.fromstring(doc, etree.XMLParser(resolve_entities=False, no_network=True))
        out: Dict[str, Any] = {"host": {}, "vms": {}}
        for m in root.findall("metric"):
            name = m.findtext("name") or ""
            if not name.startswith("E2ENative"):
                continue
            value = m.findtext("value")
            if m.get("context") == "host":
                out["host"][name] = value
            else:
                out["vms"].setdefault(m.get("uuid"), {})[name] = value
        return out

    def sample(self) -> None:
        """One bracketed sample: A, two publications, the document, B."""
        before = self.reading()
        pubs = self.wait_publications(2, 30.0)
        if pubs < 2:
            return
        doc = self.document()
        after = self.reading()
        self.records.append({"kind": "sample", "before": before, "doc": doc, "after": after})


def main() -> int:
    """Sample until SIGTERM or --max-seconds."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--uri", required=True)
    ap.add_argument("--disk", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--domain", action="append", default=[])
    ap.add_argument("--console", action="append", default=[])
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--max-seconds", type=float, default=400.0)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sampler = Sampler(args.uri, args.disk, args.domain, args.console)
    end = time.monotonic() + args.max_seconds
    written = 0
    with open(args.out, "a", encoding="utf-8") as out:
        burn = f"{os.path.basename(args.console[0])}:E2E-BURN-START" if args.console else ""
        after_burn = 0
        while not STOP and time.monotonic() < end:
            if burn in sampler.seen:
                after_burn += 1
            try:
                if after_burn <= 1:
                    sampler.sample()
            except Exception as err:  # evidence for the test: record, go on
                sampler.records.append({"kind": "error", "error": f"{type(err).__name__}: {err}"})
            pause = time.monotonic() + args.interval
            while time.monotonic() < pause and not STOP:
                sampler.poll_consoles()
                time.sleep(0.1)
            for rec in sampler.records[written:]:
                out.write(json.dumps(rec) + "\n")
            written = len(sampler.records)
            out.flush()
        sampler.poll_consoles()
        for rec in sampler.records[written:]:
            out.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
