"""Writing vhostmd.conf files and reading metrics documents, for daemon tests."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Tuple

from lxml import etree

CONFIG_HEAD = """<?xml version="1.0" ?>
<!DOCTYPE vhostmd SYSTEM "vhostmd.dtd">
<vhostmd>
  <globals>
    <disk>
      <name>host-metrics-disk</name>
      <path>{disk}</path>
      <size unit="k">{size_k}</size>
    </disk>
    <update_period>{period}</update_period>
    <path>/usr/sbin:/sbin:/usr/bin:/bin</path>
    <transport>vbd</transport>
  </globals>
  <metrics>
"""
METRIC = """    <metric type="{type}" context="{context}">
      <name>{name}</name>
      <action>{action}</action>
    </metric>
"""
CONFIG_TAIL = """  </metrics>
</vhostmd>
"""

Metric = Tuple[str, str, str, str]  # name, type, context, action


def write_config(path: Path, disk: Path, metrics: Sequence[Metric], *, period: int = 1,
                 size_k: int = 64) -> Path:
    """A vhostmd.conf with a vbd disk and the given metrics (XML-escaped actions)."""
    body = "".join(
        METRIC.format(name=n, type=t, context=c, action=_escape(a)) for n, t, c, a in metrics
    )
    path.write_text(CONFIG_HEAD.format(disk=disk, size_k=size_k, period=period) + body
                    + CONFIG_TAIL)
    return path


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def metrics_of(content: bytes) -> Dict[Tuple[str, str], str]:
    """{(name, context or vm id): value} of a metrics document (strict XML parse)."""
    root = etree.fromstring(content)
    assert root.tag == "metrics"
    out = {}
    for metric in root.iter("metric"):
        where = metric.get("id") or metric.get("context")
        out[(metric.findtext("name"), where)] = metric.findtext("value")
    return out
