"""``<metrics>``: each ``<metric>`` -> a MetricSpec, its ``<source>`` checked against a table.

The table of built-in source fields (vhostmd_py.sources.builtin.catalogue's
CATALOGUE) is handed in by whoever loads the file: the sources read the
config's records, so the config does not import the sources back.
"""

from __future__ import annotations

import logging
from types import MappingProxyType
from typing import List, Mapping, Protocol, Tuple

from lxml import etree

from vhostmd_py.config.document import line_of, text_of
from vhostmd_py.config.records import MetricSpec, Variable
from vhostmd_py.errors import ConfigError

log = logging.getLogger(__name__)

METRIC_TYPES = ("int32", "uint32", "int64", "uint64", "real32", "real64", "string")
CONTEXTS = ("host", "vm")


class BuiltinField(Protocol):
    """What the parser needs to know of one built-in source field."""

    @property
    def context(self) -> str:
        """``host`` or ``vm``."""

    @property
    def kind(self) -> str:
        """``string``, ``int``, ``real`` or ``group``."""

    @property
    def variables(self) -> Tuple[str, ...]:
        """A group's values, in order."""

    def compatible_types(self) -> Tuple[str, ...]:
        """The metric types the field's value may be published as."""


# Field name -> field, in the order a message lists them.
BuiltinFields = Mapping[str, BuiltinField]
NO_BUILTIN_FIELDS: BuiltinFields = MappingProxyType({})


def parse_metrics(root: etree._Element, file: str, fields: BuiltinFields) -> Tuple[MetricSpec, ...]:
    """Every usable ``<metric>`` of ``<metrics>``, in config order (the others logged)."""
    metrics_elem = root.find("metrics")
    metrics: List[MetricSpec] = []
    if metrics_elem is not None:
        for elem in metrics_elem.findall("metric"):
            spec = _metric(elem, file, fields)
            if spec is not None:
                metrics.append(spec)
    return tuple(metrics)


def _metric(elem: etree._Element, file: str, fields: BuiltinFields) -> MetricSpec | None:
    """One <metric>, or None (logged) when it cannot be used."""
    where = f"{file}:{line_of(elem)}"
    mtype = str(elem.get("type", ""))
    context = str(elem.get("context", ""))
    unit = elem.get("unit")
    name_elem = elem.find("name")
    action_elem = elem.find("action")
    name = text_of(name_elem) if name_elem is not None else ""
    action = text_of(action_elem) if action_elem is not None else ""
    source_elem = elem.find("source")
    source = (
        _source(source_elem, file, mtype, context, fields) if source_elem is not None else None
    )
    if not name:
        log.warning("%s: skipping metric without a name", where)
        return None
    if source is None and not action:
        log.warning("%s: skipping metric %s: empty action", where, name)
        return None
    if mtype not in (*METRIC_TYPES, "group", "xml") or context not in CONTEXTS:
        log.warning(
            "%s: skipping metric %s: bad type %r or context %r", where, name, mtype, context
        )
        return None
    variables: List[Variable] = []
    if mtype == "group":
        for var in elem.findall("variable"):
            vname = str(var.get("name", "")).strip()
            vtype = str(var.get("type", ""))
            if not vname or vtype not in METRIC_TYPES:
                log.warning(
                    "%s:%s: skipping group metric %s: variable with empty name or bad type",
                    file,
                    line_of(var),
                    name,
                )
                return None
            variables.append(Variable(vname, vtype))
        if not variables:
            log.warning("%s: skipping group metric %s: no <variable>", where, name)
            return None
    return MetricSpec(
        name=name,
        type=mtype,
        context=context,
        action=action,
        unit=str(unit) if unit else None,
        variables=tuple(variables),
        source=source,
    )


def _source(
    elem: etree._Element, file: str, mtype: str, context: str, fields: BuiltinFields
) -> str:
    """A <source> field name, checked against the table, the metric's type and context."""
    name = text_of(elem)
    field = fields.get(name)
    if field is None:
        raise ConfigError(
            file,
            f"unknown built-in source field '{name}'; known: {', '.join(fields)}",
            line_of(elem),
        )
    if field.context != context:
        raise ConfigError(
            file,
            f"built-in source field '{name}' is for context '{field.context}', "
            f"the metric has context '{context}'",
            line_of(elem),
        )
    allowed = field.compatible_types()
    if mtype not in allowed:
        raise ConfigError(
            file,
            f"built-in source field '{name}' gives {field.kind} values: metric type "
            f"'{mtype}' cannot hold them (use {', '.join(allowed)})",
            line_of(elem),
        )
    parent = elem.getparent()
    given = len(parent.findall("variable")) if parent is not None else 0
    if field.kind == "group" and given > len(field.variables):
        raise ConfigError(
            file,
            f"built-in source field '{name}' gives {len(field.variables)} values "
            f"({', '.join(field.variables)}): too many <variable> elements",
            line_of(elem),
        )
    return name
