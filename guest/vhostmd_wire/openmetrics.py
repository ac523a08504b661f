"""vhostmd metric (context, name, unit) -> Prometheus/OpenMetrics metric name and value scale.

THE mapping shared by the host's OpenMetrics endpoint (vhostmd_py.endpoint)
and the guest's ``vm-dump-metrics --format openmetrics``: the same metric
gets the same series name on both sides. Standard library only, Python 3.6+.

Rules (Prometheus naming conventions):
- prefix ``vhostmd_host_`` or ``vhostmd_vm_`` after the metric's context;
- the vhostmd name in snake_case: ``TotalCPUTime`` -> ``total_cpu_time``,
  ``NumberOfPhysicalCPUs`` -> ``number_of_physical_cpus``, ``vm.nic.rx_bytes``
  -> ``nic_rx_bytes`` (a leading context word is dropped); any character outside
  ``[a-zA-Z0-9_]`` becomes ``_``, runs of ``_`` collapse;
- a known unit becomes the base-unit suffix (``s`` -> ``_seconds``, ``MiB``
  -> ``_bytes``, ``%`` -> ``_ratio``), and :func:`value_scale` gives the
  factor that converts the value to that base unit (``MiB``: 1048576);
  an unknown unit is appended as it is, sanitised, with factor 1;
- the suffix is not repeated when the name already ends with it
  (``rx_bytes`` with unit ``B`` stays ``..._rx_bytes``);
- a name ending with a suffix OpenMetrics reserves for sample names
  (``_total``, ``_count``, ``_sum``, ``_bucket``, ``_created``, ``_info``,
  ``_gcount``, ``_gsum``) gets ``_value`` appended, so a gauge can never be
  read back as part of another family.

The result always matches ``[a-zA-Z_:][a-zA-Z0-9_:]*`` (checked by
:func:`is_valid_name`), whatever the config's name or unit holds.
"""

import re
from typing import Dict, Optional, Tuple

PREFIX = "vhostmd"

# unit as written in vhostmd.conf / the built-in catalogue -> (suffix, factor)
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
    "k": ("bytes", 1024.0),
    "kb": ("bytes", 1024.0),
    "kib": ("bytes", 1024.0),
    "m": ("bytes", 1024.0**2),
    "mb": ("bytes", 1024.0**2),
    "mib": ("bytes", 1024.0**2),
    "g": ("bytes", 1024.0**3),
    "gb": ("bytes", 1024.0**3),
    "gib": ("bytes", 1024.0**3),
    "b/s": ("bytes_per_second", 1.0),
    "kib/s": ("bytes_per_second", 1024.0),
    "mib/s": ("bytes_per_second", 1024.0**2),
    "%": ("ratio", 0.01),
    "percent": ("ratio", 0.01),
    "hz": ("hertz", 1.0),
    "khz": ("hertz", 1e3),
    "mhz": ("hertz", 1e6),
    "ghz": ("hertz", 1e9),
}

_RESERVED_SUFFIXES = (
    "_total", "_count", "_sum", "_bucket", "_created", "_info", "_gcount", "_gsum",
)
_PLURAL_ACRONYM = re.compile(r"([A-Z]{2,})s(?![a-z])")  # CPUs -> CPUS, one word
_CAMEL_1 = re.compile(r"([a-z0-9])([A-Z])")
_CAMEL_2 = re.compile(r"([A-Z]+)([A-Z][a-z])")
_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]+")
_UNDERSCORES = re.compile(r"_+")
_VALID = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def snake_case(text: str) -> str:
    """``TotalCPUTime`` -> ``total_cpu_time``; other characters -> ``_`` (may be empty)."""
    text = _PLURAL_ACRONYM.sub(lambda m: m.group(1) + "S", text)
    text = _CAMEL_2.sub(r"\1_\2", _CAMEL_1.sub(r"\1_\2", text))
    text = _NOT_NAME.sub("_", text)
    return _UNDERSCORES.sub("_", text).strip("_").lower()


def _unit(unit: Optional[str]) -> Tuple[str, float]:
    if not unit or not unit.strip():
        return "", 1.0
    known = _UNITS.get(unit.strip().lower())
    if known is not None:
        return known
    return snake_case(unit.replace("%", "percent").replace("/", "_per_")), 1.0


def metric_name(context: str, name: str, unit: Optional[str]) -> str:
    """The OpenMetrics family name of vhostmd metric NAME in CONTEXT (host or vm) with UNIT."""
    scope = snake_case(context) or "unknown"
    base = snake_case(name) or "unnamed"
    if base.startswith(scope + "_"):  # built-in fields: vm.nic.rx_bytes -> nic_rx_bytes
        base = base[len(scope) + 1 :]
    suffix = _unit(unit)[0]
    if suffix and base != suffix and not base.endswith("_" + suffix):
        base = base + "_" + suffix
    full = f"{PREFIX}_{scope}_{base}"
    if full.endswith(_RESERVED_SUFFIXES):
        full += "_value"
    return full


def value_scale(unit: Optional[str]) -> float:
    """The factor taking a value in UNIT to the base unit metric_name's suffix names."""
    return _unit(unit)[1]


def is_valid_name(name: str) -> bool:
    """Whether NAME is a valid OpenMetrics metric name."""
    return _VALID.match(name) is not None
