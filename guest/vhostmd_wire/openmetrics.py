"""vhostmd metrics as OpenMetrics (https://openmetrics.io): names, units, escaping, text.

THE mapping shared by the host's endpoint (vhostmd_py.publish.endpoint, through
prometheus_client) and the guest's ``vm-dump-metrics --format openmetrics``
(rendered here, the guest has no prometheus_client): the same metric gets the
same series name on both sides. Python 3.6+, standard library only.

Names (Prometheus naming conventions), :func:`metric_name`:
- ``vhostmd_host_`` or ``vhostmd_vm_`` after the metric's context, then the
  vhostmd name in snake_case: ``TotalCPUTime`` -> ``total_cpu_time``,
  ``NumberOfPhysicalCPUs`` -> ``number_of_physical_cpus``; a leading context
  word is dropped (``vm.nic.rx_bytes`` -> ``nic_rx_bytes``); any character
  outside ``[a-zA-Z0-9_]`` becomes ``_``;
- a known unit becomes the base-unit suffix (``s``/``ns`` -> ``_seconds``,
  ``B``/``KiB``/``MiB`` -> ``_bytes``, ``%`` -> ``_ratio``) and
  :func:`value_scale` gives the factor into that base unit; another unit is
  appended as it is, sanitised, with factor 1. Upstream's ambiguous ``k``
  (kilobytes? thousands?) is such an unknown unit: ``_k``, never scaled;
- the suffix is not repeated when the name already ends with it;
- a name ending with a suffix OpenMetrics reserves (``_total``, ``_info`` ...)
  gets ``_value`` appended, so a gauge is never read as another family's;
- the result always matches ``[a-zA-Z_:][a-zA-Z0-9_:]*`` (:func:`is_valid_name`).

Families: numeric metrics are gauges; string metrics are info families with
one sample ``<family>_info{value="<text>"} 1``. Label values are escaped as
OpenMetrics says (backslash, double quote, newline): a VM's name can never
break the format or add a label.

Labels of a VM's series, the same on both sides (:func:`vm_labels`):
``vm_uuid`` and ``vm_id``, what a metrics document says of every VM metric
(its ``uuid`` and ``id`` attributes), so a series scraped from the host and
one a guest printed are the same series. ``vm_`` because a scrape adds its
own target labels (``instance``, ``job``) and other exporters use ``id`` and
``uuid`` for other things. The VM's name is not an identity (it can change,
two VMs can have had it) and a guest's document does not carry it: the host's
endpoint gives it once per VM in the info family :data:`VM_INFO_FAMILY`,
``vhostmd_vm_info{vm_uuid=..., vm_id=..., vm_name=...} 1``, to join on (no
vhostmd metric maps to that name: a metric's family always has a word after
``vhostmd_vm_``).
"""

import math
import re
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

__all__ = [
    "PREFIX",
    "RESERVED_SUFFIXES",
    "VM_INFO_FAMILY",
    "VM_INFO_LABELS",
    "VM_LABELS",
    "Sample",
    "escape_help",
    "escape_label_value",
    "family_name",
    "format_value",
    "is_valid_name",
    "metric_name",
    "render",
    "scale_value",
    "snake_case",
    "unit_suffix",
    "value_scale",
    "vm_labels",
]

PREFIX = "vhostmd"
# The labels of every VM series (host endpoint and guest alike), in this order.
VM_LABELS = ("vm_uuid", "vm_id")
# The host endpoint's one series per VM giving its name (see the module docstring).
VM_INFO_FAMILY = "vhostmd_vm"
VM_INFO_LABELS = (*VM_LABELS, "vm_name")

# unit as written in vhostmd.conf or the built-in catalogue (compared in lower
# case) -> (base-unit suffix, factor into the base unit).
_UNITS: Dict[str, Tuple[str, float]] = {
    "ns": ("seconds", 1e-9),
    "us": ("seconds", 1e-6),
    "ms": ("seconds", 1e-3),
    "s": ("seconds", 1.0),
    "sec": ("seconds", 1.0),
    "seconds": ("seconds", 1.0),
    "b": ("bytes", 1.0),
    "byte": ("bytes", 1.0),
    "bytes": ("bytes", 1.0),
    "kib": ("bytes", 1024.0),
    "mib": ("bytes", 1024.0**2),
    "gib": ("bytes", 1024.0**3),
    "b/s": ("bytes_per_second", 1.0),
    "bytes/s": ("bytes_per_second", 1.0),
    "kib/s": ("bytes_per_second", 1024.0),
    "mib/s": ("bytes_per_second", 1024.0**2),
    "%": ("ratio", 0.01),
    "percent": ("ratio", 0.01),
    "hz": ("hertz", 1.0),
    "khz": ("hertz", 1e3),
    "mhz": ("hertz", 1e6),
    "ghz": ("hertz", 1e9),
}

# Sample-name suffixes OpenMetrics gives meaning to (counter, histogram,
# summary, info ...): a gauge named like that would be misread.
RESERVED_SUFFIXES = ("_total", "_created", "_count", "_sum", "_bucket", "_gcount", "_gsum", "_info")

_STRING_TYPE = "string"
_PLURAL_ACRONYM = re.compile(r"([A-Z]{2,})s(?![a-z])")  # CPUs -> CPUS, one word
_CAMEL_1 = re.compile(r"([a-z0-9])([A-Z])")
_CAMEL_2 = re.compile(r"([A-Z]+)([A-Z][a-z])")
_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]+")
_UNDERSCORES = re.compile(r"_+")
_VALID = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")

Number = Union[int, float]


def snake_case(text: str) -> str:
    """``TotalCPUTime`` -> ``total_cpu_time``; other characters -> ``_`` (may be empty)."""
    text = _PLURAL_ACRONYM.sub(lambda m: m.group(1) + "S", text.strip())
    text = _CAMEL_2.sub(r"\1_\2", _CAMEL_1.sub(r"\1_\2", text))
    text = _NOT_NAME.sub("_", text)
    return _UNDERSCORES.sub("_", text).strip("_").lower()


def unit_suffix(unit: Optional[str]) -> Optional[Tuple[str, float]]:
    """(suffix, factor into the base unit) of UNIT; None without a unit."""
    if not unit or not unit.strip():
        return None
    known = _UNITS.get(unit.strip().lower())
    if known is not None:
        return known
    suffix = snake_case(unit.replace("%", "percent").replace("/", "_per_"))
    return (suffix, 1.0) if suffix else None


def metric_name(context: str, name: str, unit: Optional[str]) -> str:
    """The OpenMetrics family name of vhostmd metric NAME in CONTEXT (host or vm) with UNIT."""
    scope = snake_case(context) or "unknown"
    base = snake_case(name) or "unnamed"
    if base.startswith(scope + "_"):  # built-in fields: vm.nic.rx_bytes -> nic_rx_bytes
        base = base[len(scope) + 1 :]
    mapped = unit_suffix(unit)
    if mapped is not None and base != mapped[0] and not base.endswith("_" + mapped[0]):
        base = base + "_" + mapped[0]
    full = f"{PREFIX}_{scope}_{base}"
    if full.endswith(RESERVED_SUFFIXES):
        full += "_value"
    return full


def family_name(context: str, name: str, unit: Optional[str], type_name: str) -> str:
    """metric_name() for a metric of TYPE_NAME: a string's unit names no base unit."""
    return metric_name(context, name, None if type_name == _STRING_TYPE else unit)


def value_scale(unit: Optional[str]) -> float:
    """The factor taking a value in UNIT to the base unit metric_name's suffix names."""
    mapped = unit_suffix(unit)
    return 1.0 if mapped is None else mapped[1]


def scale_value(value: Number, unit: Optional[str]) -> Number:
    """VALUE in the family's base unit; an int stays an exact int for an integral factor."""
    factor = value_scale(unit)
    if factor == 1.0:
        return value
    if isinstance(value, int) and factor.is_integer():
        return value * int(factor)
    return value * factor


def is_valid_name(name: str) -> bool:
    """Whether NAME is a valid OpenMetrics metric name."""
    return _VALID.match(name) is not None


def escape_label_value(text: str) -> str:
    r"""A label value as OpenMetrics quotes it: \ -> \\, " -> \", newline -> \n."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    r"""HELP text as OpenMetrics escapes it: \ -> \\, newline -> \n (quotes stay)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: Number) -> str:
    """A sample value: ints exactly (also beyond 2**53), reals by repr, NaN/+Inf/-Inf."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Sample(NamedTuple):
    """One metric value to render: context "host"/"vm", the vm's labels, the typed value."""

    context: str
    name: str
    type_name: str
    unit: Optional[str]
    value: Union[int, float, str]
    labels: Tuple[Tuple[str, str], ...]


def vm_labels(uuid: Optional[str], vm_id: Optional[int]) -> Tuple[Tuple[str, str], ...]:
    """The labels of a VM's series: ``vm_uuid`` and ``vm_id`` ("" when not known)."""
    return (("vm_uuid", uuid or ""), ("vm_id", "" if vm_id is None else str(vm_id)))


def _labels(pairs: Iterable[Tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


class _Family:
    __slots__ = ("help", "kind", "lines", "name", "seen", "unit")

    def __init__(self, name: str, kind: str, unit: Optional[str], help_text: str) -> None:
        self.name = name
        self.kind = kind
        self.unit = unit
        self.help = help_text
        self.lines: List[str] = []
        self.seen: Dict[Tuple[Tuple[str, str], ...], None] = {}


def render(samples: Iterable[Sample]) -> str:
    """OpenMetrics text of the samples, families grouped, ending with ``# EOF``.

    The first sample of a family fixes its kind (gauge or info); a later
    sample of another kind under the same name, or with label values already
    given, is left out (the document's first-wins rule for duplicates).
    """
    families: Dict[str, _Family] = {}
    taken: Dict[str, str] = {}  # sample name -> family name
    for s in samples:
        is_info = s.type_name == _STRING_TYPE
        fam_name = family_name(s.context, s.name, s.unit, s.type_name)
        sample_name = fam_name + "_info" if is_info else fam_name
        family = families.get(fam_name)
        kind = "info" if is_info else "gauge"
        if family is None:
            if sample_name in taken or fam_name in taken:
                continue  # another family's sample name: leave it out
            mapped = None if is_info else unit_suffix(s.unit)
            unit_text = f", unit {s.unit}" if s.unit else ""
            help_text = f"vhostmd {s.context} metric {s.name} (type {s.type_name}{unit_text})"
            family = families[fam_name] = _Family(
                fam_name, kind, mapped[0] if mapped else None, help_text
            )
            taken[sample_name] = fam_name
            taken[fam_name] = fam_name
        if family.kind != kind or s.labels in family.seen:
            continue
        family.seen[s.labels] = None
        if is_info:
            pairs = (*s.labels, ("value", str(s.value)))
            family.lines.append(f"{sample_name}{_labels(pairs)} 1")
        else:
            number = scale_value(s.value, s.unit)  # type: ignore[arg-type]
            family.lines.append(f"{sample_name}{_labels(s.labels)} {format_value(number)}")
    out: List[str] = []
    for family in families.values():
        out.append(f"# TYPE {family.name} {family.kind}")
        if family.unit:
            out.append(f"# UNIT {family.name} {family.unit}")
        out.append(f"# HELP {family.name} {escape_help(family.help)}")
        out.extend(family.lines)
    out.append("# EOF")
    return "\n".join(out) + "\n"
