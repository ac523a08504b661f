"""``<accounting>`` -> AccountingConfig: per-period byte budgets (PlanetLab bwmon's).

Optional, after ``<alarms>``; like it, it may name a file whose root is the
same element (vhostmd_py.config.document.included).
"""

from __future__ import annotations

from typing import List, Tuple

from lxml import etree

from vhostmd_py.config.document import included, line_of, vm_selector, yes
from vhostmd_py.config.records import DEFAULT_PERIOD, AccountingConfig, Budget, VmBudget
from vhostmd_py.config.units import DEFAULT_STATE_DIR, parse_duration, parse_size
from vhostmd_py.errors import ConfigError


def _size(raw: str, file: str, line: int | None, what: str) -> int:
    """The size attribute WHAT in bytes (vhostmd_py.config.units.parse_size)."""
    try:
        return parse_size(raw)
    except ValueError:
        raise ConfigError(
            file, f"{what}={raw!r} is not a size (e.g. 1048576, 512M, 10G)", line
        ) from None


def _duration(raw: str, file: str, line: int | None, what: str) -> int:
    """The duration attribute WHAT in seconds (vhostmd_py.config.units.parse_duration)."""
    try:
        return parse_duration(raw)
    except ValueError:
        raise ConfigError(
            file, f"{what}={raw!r} is not a duration (e.g. 86400, 1d, 12h)", line
        ) from None


def _budget_attrs(
    elem: etree._Element, file: str
) -> Tuple[int | None, int | None, bool | None, bool, bool]:
    values: List[int | None] = []
    clears: List[bool] = []
    for attr in ("tx", "rx"):
        raw = elem.get(attr)
        if raw is not None and raw.strip() == "none":
            values.append(None)
            clears.append(True)
        else:
            values.append(None if raw is None else _size(str(raw), file, line_of(elem), attr))
            clears.append(False)
    enforce = None if elem.get("enforce") is None else elem.get("enforce") == "yes"
    return values[0], values[1], enforce, clears[0], clears[1]


def parse_accounting(elem: etree._Element, file: str, grammar: etree.DTD) -> AccountingConfig:
    """``<accounting>`` (or the file it names) -> AccountingConfig."""
    root, where = included(elem, file, grammar)
    period = DEFAULT_PERIOD
    if root.get("period") is not None:
        period = _duration(str(root.get("period")), where, line_of(root), "period")
        if period < 1:
            raise ConfigError(where, "period must be at least 1 second", line_of(root))
    offset = 0
    if root.get("period_offset") is not None:
        offset = _duration(
            str(root.get("period_offset")), where, line_of(root), "period_offset"
        )
    budget = Budget()
    overrides: List[VmBudget] = []
    seen_default = False
    for child in root:
        if not isinstance(child.tag, str):
            continue
        if child.tag == "budget":
            if seen_default:
                raise ConfigError(where, "more than one default <budget>", line_of(child))
            seen_default = True
            tx, rx, enforce, _, _ = _budget_attrs(child, where)
            budget = Budget(tx, rx, bool(enforce))
        elif child.tag == "vm":
            uuid, name = vm_selector(child, where)
            subs = [s for s in child if isinstance(s.tag, str)]
            if len(subs) != 1 or subs[0].tag != "budget":
                raise ConfigError(
                    where, "<accounting><vm> must hold exactly one <budget>", line_of(child)
                )
            tx, rx, enforce, clear_tx, clear_rx = _budget_attrs(subs[0], where)
            overrides.append(VmBudget(uuid, name, tx, rx, enforce, clear_tx, clear_rx))
    return AccountingConfig(
        period=period,
        period_offset=offset % period,
        state_dir=str(root.get("state_dir") or DEFAULT_STATE_DIR),
        guest_metrics=yes(root, "guest_metrics", False),
        budget=budget,
        overrides=tuple(overrides),
    )
