"""vhostmd metrics as OpenMetrics text (https://openmetrics.io): names, units, escaping.

The one place both ends map a vhostmd metric to an OpenMetrics family, so
the guest's ``vm-dump-metrics --format openmetrics`` and the host's endpoint
(prometheus_client) name the same metric the same way:

- numeric metrics (int32..uint64, real32, real64) are gauges named
  ``vhostmd_<context>_<snake_case(name)>[_<unit suffix>]``, e.g. TotalCPUTime
  with unit "s" in vm context is ``vhostmd_vm_total_cpu_time_seconds``;
- a unit maps to a base-unit suffix only when it is one of UNIT_SUFFIXES
  (the value is then multiplied into the base unit: MiB -> bytes); any
  other unit (upstream's "k", "%" ...) leaves the name plain and is named
  in the HELP text only;
- string metrics are info families ``vhostmd_<context>_<snake_case(name)>``
  with the one sample ``..._info{value="<text>"} 1`` (and the vm labels);
- vm-context samples carry the labels ``uuid`` and ``id`` (when known);
- a name that would end in a suffix OpenMetrics reserves for other types
  gets ``_value`` appended, so a parser never mistakes the family.

Python 3.6+, standard library only (the guest runs it).
"""

import math
import re
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

__all__ = [
    "PREFIX",
    "RESERVED_SUFFIXES",
    "UNIT_SUFFIXES",
    "Sample",
    "escape_help",
    "escape_label_value",
    "family_name",
    "format_value",
    "render",
    "scale_value",
    "snake_case",
    "unit_suffix",
]

PREFIX = "vhostmd"

# unit attribute -> (base-unit suffix, multiplier into the base unit).
# Only units that are unambiguous: upstream's "k" (kilobytes? thousands?)
# is not among them.
UNIT_SUFFIXES = {
    "s": ("seconds", 1),
    "sec": ("seconds", 1),
    "seconds": ("seconds", 1),
    "B": ("bytes", 1),
    "bytes": ("bytes", 1),
    "KiB": ("bytes", 1 << 10),
    "MiB": ("bytes", 1 << 20),
    "GiB": ("bytes", 1 << 30),
}

# Sample-name suffixes OpenMetrics gives meaning to (counter, histogram,
# summary, info ...): a gauge named like that would be misread.
RESERVED_SUFFIXES = ("_total", "_created", "_count", "_sum", "_bucket", "_gcount", "_gsum", "_info")

_STRING_TYPE = "string"
# An acronym's plural stays one word: CPUs -> cpus, not cp_us.
_PLURAL = re.compile(r"([A-Z]{2,})s(?![a-z])")
_CAMEL_1 = re.compile(r"([a-z0-9])([A-Z])")
_CAMEL_2 = re.compile(r"([A-Z]+)([A-Z][a-z])")
_NOT_NAME = re.compile(r"[^a-z0-9]+")

Number = Union[int, float]


def snake_case(name: str) -> str:
    """TotalCPUTime -> total_cpu_time; anything outside [a-z0-9] becomes one "_"."""
    text = _PLURAL.sub(r"\1S", name.strip())
    text = _CAMEL_2.sub(r"\1_\2", _CAMEL_1.sub(r"\1_\2", text))
    return _NOT_NAME.sub("_", text.lower()).strip("_") or "unnamed"


def unit_suffix(unit: Optional[str]) -> Optional[Tuple[str, int]]:
    """(suffix, multiplier) for a unit that maps to a base unit, else None."""
    if not unit:
        return None
    return UNIT_SUFFIXES.get(unit.strip())


def family_name(context: str, name: str, unit: Optional[str], type_name: str) -> str:
    """The OpenMetrics family name of metric ``name`` in ``context`` ("host"/"vm")."""
    base = f"{PREFIX}_{context}_{snake_case(name)}"
    if type_name != _STRING_TYPE:
        mapped = unit_suffix(unit)
        if mapped is not None and not base.endswith("_" + mapped[0]):
            base += "_" + mapped[0]
    if base.endswith(RESERVED_SUFFIXES):
        base += "_value"
    return base


def scale_value(value: Number, unit: Optional[str]) -> Number:
    """The value in the family's base unit (ints stay exact ints)."""
    mapped = unit_suffix(unit)
    if mapped is None or mapped[1] == 1:
        return value
    return value * mapped[1]


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
