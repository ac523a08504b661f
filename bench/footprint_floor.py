#!/usr/bin/env python3
"""The floor of bench_footprint.py: upstream's echo3 work in the fewest lines of Python.

Not a daemon: what any Python program doing this work with the two libraries
the product requires (lxml to validate the config against its DTD, libvirt to
list the domains) costs, so the benchmark can tell which part of our memory
and start-up is the daemon's and which is the interpreter's and those
libraries'. Each cycle: list the running domains, run every vm metric's
action for each (three at a time, /bin/sh -c, as upstream), build the
document, write header and document to the disk (no busy flag, no O_DIRECT,
no checks of any kind). Run by bench_footprint.py as
`python footprint_floor.py CONFIG URI`; stop it with SIGTERM.
"""

import os
import struct
import subprocess
import sys
import time

import libvirt
from lxml import etree

SIGNATURE = 0x6D766264  # "mvbd", big-endian as upstream writes it


def main() -> None:
    config_path, uri = sys.argv[1], sys.argv[2]
    parser = etree.XMLParser(dtd_validation=True, load_dtd=True, no_network=True)
    root = etree.parse(config_path, parser).getroot()
    disk = root.findtext("globals/disk/path")
    period = int(root.findtext("globals/update_period"))
    metrics = [(m.findtext("name"), m.get("type"), m.findtext("action"))
               for m in root.iter("metric") if m.get("context") == "vm"]
    conn = libvirt.openReadOnly(uri)
    while True:
        start = time.monotonic()
        parts = ["<metrics>\n"]
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            name, vmid, uuid = dom.name(), str(dom.ID()), dom.UUIDString()
            procs = [subprocess.Popen(["/bin/sh", "-c", action.replace("NAME", name)
                                       .replace("VMID", vmid).replace("UUID", uuid)],
                                      stdout=subprocess.PIPE) for _, _, action in metrics]
            for (mname, mtype, _), proc in zip(metrics, procs):
                value = proc.communicate()[0].decode().strip()
                parts.append(f'  <metric type="{mtype}" context="vm" id="{vmid}" uuid="{uuid}">'
                             f"<name>{mname}</name><value>{value}</value></metric>\n")
        parts.append("</metrics>\n")
        body = "".join(parts).encode()
        checksum = sum(b - 256 if b > 127 else b for b in body) & 0xFFFFFFFF
        with open(disk, "r+b" if os.path.exists(disk) else "wb") as f:
            f.write(struct.pack(">IIII", SIGNATURE, 0, checksum, len(body)) + body)
        time.sleep(max(0.0, period - (time.monotonic() - start)))


if __name__ == "__main__":
    main()
