"""The metrics as plain Python data, JSON, OpenMetrics text and a terminal table.

JSON schema (``to_dict``; ``SCHEMA_VERSION`` 1)::

    {
      "schema": 1,
      "source": "metrics disk /dev/vdb",
      "host": {NAME: METRIC, ...},
      "vms": [{"id": INT|null, "uuid": STR|null, "metrics": {NAME: METRIC, ...}}, ...],
      "publication_time": FLOAT|null,   # PublicationTime, seconds since the epoch
      "update_period": INT|null,        # UpdatePeriod, seconds
      "age": FLOAT|null,                # guest wall clock - publication_time
      "stale": BOOL|null,               # freshness.py's rule (one read: the age rule only)
      "identity": STR|null              # HostIdentity
    }
    METRIC = {"type": "uint64", "unit": STR|null, "value": VALUE}

VALUE is typed as the library's ``Metric.value``: a JSON integer for
int32..uint64 (exact at any size: Python's json reads big integers back
exactly), a JSON number with a fraction or exponent for real32/real64 (repr,
so the float reads back bit-exact; non-finite reals, which JSON cannot
carry, are the strings "NaN", "Infinity", "-Infinity"), a string for string.
A value that does not fit its type is null, with "error" giving the reason.
Metrics appear in document order; duplicates keep the first, as lookups do.
``typed_values(json.loads(text))`` gives {(context, uuid, name): value},
equal (value and Python type) to the library's typed API.
"""

import json
import math
import time
from typing import Any, Dict, List, Optional, Tuple, Union

from vhostmd_wire import openmetrics

from .document import Metric, MetricContext, MetricsDocument
from .errors import MetricsError
from .freshness import (
    document_host_identity,
    document_is_stale,
    publication_time,
    update_period,
)

__all__ = [
    "SCHEMA_VERSION",
    "render_table",
    "to_dict",
    "to_json",
    "to_openmetrics",
    "typed_values",
]

SCHEMA_VERSION = 1
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_REAL_TYPES = ("real32", "real64")


def _json_value(value: Union[int, float, str]) -> Union[int, float, str]:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _metric_dict(m: Metric) -> Dict[str, Any]:
    out: Dict[str, Any] = {"type": m.type_name, "unit": m.unit}
    try:
        out["value"] = _json_value(m.value)
    except MetricsError as err:
        out["value"] = None
        out["error"] = str(err)
    return out


def _freshness(doc: MetricsDocument, now: float, unchanged_for: float) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, getter in (
        ("publication_time", publication_time),
        ("update_period", update_period),
        ("identity", document_host_identity),
    ):
        try:
            out[key] = getter(doc)
        except MetricsError:
            out[key] = None  # published but malformed: shown as unknown
    published = out["publication_time"]
    out["age"] = None if published is None else round(now - published, 3)
    try:
        out["stale"] = document_is_stale(doc, now, unchanged_for)
    except MetricsError:
        out["stale"] = None
    return out


def to_dict(
    doc: MetricsDocument, *, now: Optional[float] = None, unchanged_for: float = 0.0
) -> Dict[str, Any]:
    """The document as plain data (the JSON schema above); now = guest wall clock."""
    now = time.time() if now is None else now
    host: Dict[str, Any] = {}
    vms: Dict[Optional[str], Dict[str, Any]] = {}
    for m in doc:
        if m.context is MetricContext.HOST:
            host.setdefault(m.name, _metric_dict(m))
            continue
        vm = vms.get(m.vm_uuid)
        if vm is None:
            vm = vms[m.vm_uuid] = {"id": m.vm_id, "uuid": m.vm_uuid, "metrics": {}}
        vm["metrics"].setdefault(m.name, _metric_dict(m))
    out: Dict[str, Any] = {"schema": SCHEMA_VERSION, "source": doc.source, "host": host}
    out["vms"] = list(vms.values())
    out.update(_freshness(doc, now, unchanged_for))
    return out


def to_json(doc: MetricsDocument, *, now: Optional[float] = None, indent: int = 2) -> str:
    """to_dict as strict JSON text (no NaN literals), with a final newline."""
    return json.dumps(to_dict(doc, now=now), indent=indent, allow_nan=False) + "\n"


Key = Tuple[str, Optional[str], str]


def _typed(entry: Dict[str, Any]) -> Union[int, float, str, None]:
    value = entry.get("value")
    if entry.get("type") in _REAL_TYPES:
        if isinstance(value, str):
            return _NONFINITE[value]
        if isinstance(value, int):  # a JSON writer may drop ".0"
            return float(value)
    return value  # type: ignore[no-any-return]


def typed_values(data: Dict[str, Any]) -> Dict[Key, Union[int, float, str, None]]:
    """{(context, uuid, name): typed value} from parsed JSON (uuid None for host)."""
    out: Dict[Key, Union[int, float, str, None]] = {}
    for name, entry in data["host"].items():
        out[("host", None, name)] = _typed(entry)
    for vm in data["vms"]:
        for name, entry in vm["metrics"].items():
            out[("vm", vm["uuid"], name)] = _typed(entry)
    return out


def to_openmetrics(doc: MetricsDocument) -> str:
    """The document as OpenMetrics text (names and escaping: vhostmd_wire.openmetrics)."""
    samples: List[openmetrics.Sample] = []
    for m in doc:
        try:
            value = m.value
        except MetricsError:
            continue  # a value that does not fit its type has no sample
        labels: Tuple[Tuple[str, str], ...] = ()
        if m.context is MetricContext.VM:
            labels = openmetrics.vm_labels(m.vm_uuid, m.vm_id)
        samples.append(
            openmetrics.Sample(m.context.context_name, m.name, m.type_name, m.unit, value, labels)
        )
    return openmetrics.render(samples)


# --- the --watch table ----------------------------------------------------------------

# Names shortened to fit keep at least this many characters (head ~ tail).
_MIN_NAME = 12
_INDENT = "  "
_GAP = "  "


def _shown(value: Union[int, float, str]) -> str:
    if isinstance(value, str):
        return value.replace("\n", "\\n")
    return repr(value) if isinstance(value, float) else str(value)


def _short_name(name: str, width: int) -> str:
    """NAME in WIDTH characters: its head and tail around a '~' (tails tell devices apart)."""
    if len(name) <= width:
        return name
    tail = (width - 1) // 2
    return name[: width - 1 - tail] + "~" + name[len(name) - tail:]


def _wrap_words(words: List[str], width: int) -> List[str]:
    """WORDS joined by two spaces, a new line where the next one would pass WIDTH."""
    lines: List[str] = []
    for word in words:
        if lines and len(lines[-1]) + len(_GAP) + len(word) <= width:
            lines[-1] += _GAP + word
        else:
            lines.append(word)
    return lines


def _chunks(text: str, width: int) -> List[str]:
    return [text[i: i + width] for i in range(0, len(text), width)] or [""]


def render_table(
    doc: Optional[MetricsDocument],
    *,
    now: float,
    unchanged_for: float = 0.0,
    error: Optional[str] = None,
    width: int = 120,
) -> str:
    """One --watch frame: a header (time, age, staleness, identity), then the table.

    The table fits WIDTH columns without cutting a value: the metrics are
    grouped under a line per context (``host``, ``vm ID UUID``), so the
    table has only NAME, VALUE and UNIT; names are shortened in the middle
    when they do not fit, and a value too long for its column goes on lines
    of its own below its name. The header and the error line wrap.
    """
    width = max(width, 2 * _MIN_NAME)
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    if doc is None:
        return "\n".join(
            [f"vhostmd metrics at {stamp}", *_chunks(f"error: {error}", width)]) + "\n"
    fresh = _freshness(doc, now, unchanged_for)
    if fresh["stale"] is None:
        state = "freshness unknown"
    else:
        state = "STALE" if fresh["stale"] else "fresh"
    age = "age ?" if fresh["age"] is None else f"age {fresh['age']:.1f} s"
    lines = _wrap_words(
        [f"vhostmd metrics at {stamp}", age, state, f"host {fresh['identity'] or '?'}"], width)
    if error:
        lines += _chunks(f"error: {error} (showing the last document read)", width)
    groups: Dict[str, List[Tuple[str, str, str]]] = {"host": []}
    for m in doc:
        where = "host"
        if m.context is MetricContext.VM:
            where = f"vm {'' if m.vm_id is None else m.vm_id} {m.vm_uuid or ''}".strip()
        try:
            shown = _shown(m.value)
        except MetricsError:
            shown = f"<invalid {m.type_name}>"
        groups.setdefault(where, []).append((m.name, shown, m.unit or ""))
    rows = [("NAME", "VALUE", "UNIT")] + [r for g in groups.values() for r in g]
    unit_w = max(len(r[2]) for r in rows)
    name_w = max(len(r[0]) for r in rows)
    # The value column: as wide as the widest value that still leaves a
    # name column of _MIN_NAME; wider values go on lines of their own.
    room = width - len(_INDENT) - len(_GAP) * 2 - unit_w
    value_w = max([len(r[1]) for r in rows if len(r[1]) <= room - _MIN_NAME] + [len("VALUE")])
    name_w = max(min(name_w, room - value_w), _MIN_NAME)

    def line(name: str, value: str, unit: str) -> str:
        text = f"{_INDENT}{_short_name(name, name_w):<{name_w}}{_GAP}{value:>{value_w}}"
        return (text + _GAP + unit).rstrip()

    lines.append(line(*rows[0]))
    for where, group in groups.items():
        if not group:
            continue
        lines += _chunks(where, width)
        for name, shown, unit in group:
            if len(shown) <= value_w:
                lines.append(line(name, shown, unit))
                continue
            # Too long for the column: the name (and unit), then the whole
            # value on lines of its own, indented twice.
            lines.append(line(name, "", unit))
            lines += [_INDENT * 2 + c for c in _chunks(shown, width - 2 * len(_INDENT))]
    return "\n".join(lines) + "\n"
