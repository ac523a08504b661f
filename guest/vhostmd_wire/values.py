"""The metric type rules (int32 .. real64, string), shared by both sides.

The guest converts values with them (vhostmd_wire.document), the host checks
a value with check_value before it publishes it. Apart from the document
parser so that the host, which renders but never parses a document, does
not load expat for them.
"""

import enum
import math
import re
import struct
from typing import Dict, Optional, Tuple, Union

MetricValue = Union[int, float, str]


class MetricType(enum.IntEnum):
    """Value types, numbered as upstream's ``metric_type`` enum (libmetrics.h)."""

    INT32 = 0
    UINT32 = 1
    INT64 = 2
    UINT64 = 3
    REAL32 = 4
    REAL64 = 5
    STRING = 6

    @classmethod
    def from_name(cls, name: str) -> "MetricType":
        """The type for a ``type=`` attribute; case-insensitive like upstream's strcasecmp."""
        try:
            return cls[name.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown metric type {name!r}") from None

    @property
    def type_name(self) -> str:
        """The attribute spelling: int32 ... string."""
        return self.name.lower()


class MetricContext(enum.IntEnum):
    """Contexts, numbered as upstream's ``metric_context`` enum."""

    HOST = 0
    VM = 1

    @property
    def context_name(self) -> str:
        """The attribute spelling: host or vm."""
        return self.name.lower()

    @classmethod
    def parse(cls, value: Union["MetricContext", int, str]) -> "MetricContext":
        """A context from a member, upstream's number, or the spelling "host"/"vm"."""
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"{value!r} is not a metric context (host or vm)") from None
        return cls(value)


_INT_RANGES: Dict[MetricType, Tuple[int, int]] = {
    MetricType.INT32: (-(2**31), 2**31 - 1),
    MetricType.UINT32: (0, 2**32 - 1),
    MetricType.INT64: (-(2**63), 2**63 - 1),
    MetricType.UINT64: (0, 2**64 - 1),
}
# Strict forms: Python's int()/float() also accept "1_000", which no C reader
# would; upstream's atoi/atof silently accept "42abc" as 42, which we refuse.
INT_RE = re.compile(r"[+-]?[0-9]+\Z")
_REAL_RE = re.compile(
    r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)\Z", re.IGNORECASE
)
# Upstream hosts keep the action's trailing newline in the value
# (`<value>42\n</value>`, FACTS.md section 2); our host strips it (a deviation, COMPATIBILITY.md).
# Both must read the same, so trailing whitespace is never part of a value.
_TRAILING = " \t\r\n"


def parse_value(type_name: str, text: str) -> MetricValue:
    """The typed value of text for type type_name; ValueError (the reason) when it does not fit."""
    mtype = MetricType.from_name(type_name)
    stripped = text.rstrip(_TRAILING)
    if mtype is MetricType.STRING:
        return stripped
    token = stripped.strip()
    if mtype in _INT_RANGES:
        if not INT_RE.match(token):
            raise ValueError("not a decimal integer")
        number = int(token, 10)
        low, high = _INT_RANGES[mtype]
        if not low <= number <= high:
            raise ValueError(f"out of range {low}..{high}")
        return number
    if not _REAL_RE.match(token):
        raise ValueError("not a decimal number")
    real = float(token)
    if mtype is MetricType.REAL32 and math.isfinite(real):
        try:
            # Round to what a C float holds, as upstream's union member would.
            (real,) = struct.unpack("<f", struct.pack("<f", real))
        except OverflowError:
            raise ValueError("out of range for real32") from None
    return real


def check_value(type_name: str, text: str) -> Optional[str]:
    """None when text is a valid value of type type_name, else the reason it is not."""
    try:
        parse_value(type_name, text)
    except ValueError as err:
        return str(err)
    return None
