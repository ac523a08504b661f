"""Configs with the vhostmd-py extensions of issue 15 (per-VM disks, freshness)."""

from __future__ import annotations

from pathlib import Path

CONFIG = """<?xml version="1.0" ?>
<!DOCTYPE vhostmd SYSTEM "vhostmd.dtd">
<vhostmd>
  <globals>
    <disk>
      <name>host-metrics-disk</name>
      <path>{disk}</path>
      <size unit="k">64</size>
    </disk>
    <update_period>1</update_period>
    <path>/usr/sbin:/sbin:/usr/bin:/bin</path>
    <transport>vbd</transport>
    {extra}
  </globals>
  <metrics>
    <metric type="string" context="host">
      <name>HostTag</name>
      <action>echo host-tag</action>
    </metric>
    <metric type="string" context="vm">
      <name>Ident</name>
      <action>echo NAME-VMID-UUID</action>
    </metric>
  </metrics>
</vhostmd>
"""


def write_conf(tmp: Path, extra: str) -> Path:
    """A config with a shared disk in TMP and EXTRA in <globals>."""
    path = tmp / "vhostmd.conf"
    path.write_text(CONFIG.format(disk=tmp / "vhostmd0", extra=extra))
    return path
