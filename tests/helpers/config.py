"""vhostmd.conf text for tests and benches: one template, the parts a test varies as arguments.

Plain string building (no lxml, no vhostmd_py) so the benches and the pypy3
guest tier can import it too. The layout is fixed, one element per line, so
tests can rely on line numbers. With the defaults (DOCTYPE, no <virtio>, one
transport, no extra <globals> element):

     1 <?xml version="1.0" ?>
     2 <!DOCTYPE vhostmd SYSTEM "vhostmd.dtd">
     3 <vhostmd>
     4   <globals>
     5     <disk>
     6       <name>host-metrics-disk</name>
     7       <path>DISK</path>
     8       <size unit="k">64</size>
     9     </disk>
    10     <update_period>1</update_period>
    11     <path>/usr/sbin:/sbin:/usr/bin:/bin</path>
    12     <transport>vbd</transport>
    13     EXTRA (each element of `extra` on its own line)
       </globals>
       <metrics>
         ...
       </metrics>
     AFTER_METRICS (e.g. <alarms>)
     </vhostmd>

doctype=False drops line 2; a <virtio> block (channel_path, max_channels,
expiration_time, as given) goes between </disk> and <update_period>.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence, Tuple, Union

Metric = Tuple[str, str, str, str]  # name, type, context, action
SEARCH_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"

METRIC = """    <metric type="{type}" context="{context}"{unit}>
      <name>{name}</name>
      <action>{action}</action>
    </metric>
"""


def escape(text: str) -> str:
    """TEXT as XML character data."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def metric_xml(name: str, type_: str, context: str, action: str, *,
               unit: str | None = None, escaped: bool = True) -> str:
    """One <metric> element (4 lines), with a unit attribute when UNIT is given; ACTION is
    XML-escaped unless escaped=False."""
    return METRIC.format(name=name, type=type_, context=context,
                         unit="" if unit is None else f' unit="{unit}"',
                         action=escape(action) if escaped else action)


def config_text(
    disk: Union[Path, str],
    metrics: Sequence[Union[Metric, str]] = (),
    *,
    size: Union[int, str] = 64,
    unit: str = "k",
    period: Union[int, str] = 1,
    transports: Sequence[str] = ("vbd",),
    virtio: Mapping[str, object] | None = None,
    extra: Union[str, Sequence[str]] = (),
    after_metrics: str = "",
    doctype: bool = True,
    search_path: str = SEARCH_PATH,
    disk_name: str = "host-metrics-disk",
) -> str:
    """A vhostmd.conf. METRICS: (name, type, context, action) tuples (actions XML-escaped)
    or raw XML strings, in order. VIRTIO: the <virtio> children, in the order given.
    EXTRA: elements for the end of <globals> (<history .../>, <disk_per_vm .../>, ...).
    AFTER_METRICS: raw text between </metrics> and </vhostmd> (e.g. an <alarms> section)."""
    lines = ['<?xml version="1.0" ?>\n']
    if doctype:
        lines.append('<!DOCTYPE vhostmd SYSTEM "vhostmd.dtd">\n')
    lines += [
        "<vhostmd>\n",
        "  <globals>\n",
        "    <disk>\n",
        f"      <name>{disk_name}</name>\n",
        f"      <path>{disk}</path>\n",
        f'      <size unit="{unit}">{size}</size>\n',
        "    </disk>\n",
    ]
    if virtio is not None:
        lines.append("    <virtio>\n")
        lines += [f"      <{key}>{value}</{key}>\n" for key, value in virtio.items()]
        lines.append("    </virtio>\n")
    lines += [
        f"    <update_period>{period}</update_period>\n",
        f"    <path>{search_path}</path>\n",
    ]
    lines += [f"    <transport>{t}</transport>\n" for t in transports]
    lines += [f"    {element}\n" for element in ([extra] if isinstance(extra, str) else extra)
              if element]
    lines += ["  </globals>\n", "  <metrics>\n"]
    lines += [m if isinstance(m, str) else metric_xml(*m) for m in metrics]
    lines += ["  </metrics>\n", after_metrics, "</vhostmd>\n"]
    return "".join(lines)


def write_config(path: Path, disk: Union[Path, str],
                 metrics: Sequence[Union[Metric, str]] = (), **options: Any) -> Path:
    """Write config_text(DISK, METRICS, **OPTIONS) to PATH (OPTIONS: as config_text's); PATH."""
    path.write_text(config_text(disk, metrics, **options))
    return path
