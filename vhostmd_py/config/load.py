"""vhostmd.conf -> Config: read the file, validate it against the DTD, convert each section.

The order of the checks is the order of the file (``<disk>``, the globals,
``<metrics>``, then ``<alarms>`` and ``<accounting>``), so the first error an
operator sees is the first one in the file.
"""

from __future__ import annotations

import os
from dataclasses import replace

from lxml import etree

from vhostmd_py.config.disk import disk_path, disk_size, parse_disk_per_vm
from vhostmd_py.config.document import child, line_of, load_dtd, parse_root, text_of, validate
from vhostmd_py.config.endpoint import parse_endpoint
from vhostmd_py.config.freshness import parse_freshness
from vhostmd_py.config.history import parse_history
from vhostmd_py.config.metrics import NO_BUILTIN_FIELDS, BuiltinFields, parse_metrics
from vhostmd_py.config.records import DEFAULT_PATH, Config
from vhostmd_py.config.transports import parse_transports, parse_virtio
from vhostmd_py.config.units import UPDATE_PERIOD_RANGE, integer_in
from vhostmd_py.errors import ConfigError, StrPath


def load_config(
    path: StrPath,
    *,
    dtd: StrPath | None = None,
    builtin_fields: BuiltinFields = NO_BUILTIN_FIELDS,
) -> Config:
    """Read, validate and convert a vhostmd.conf; ConfigError names file, line and reason.

    BUILTIN_FIELDS are the fields a ``<source>`` may name (the daemon passes
    vhostmd_py.sources.builtin.catalogue.CATALOGUE); without them a metric
    with a ``<source>`` is refused.
    """
    file = os.fspath(path)
    try:
        with open(file, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise ConfigError(file, f"could not read file: {err.strerror or err}") from err
    return parse_config(data, file=file, dtd=dtd, builtin_fields=builtin_fields)


def parse_config(
    data: bytes,
    *,
    file: str = "<config>",
    dtd: StrPath | None = None,
    builtin_fields: BuiltinFields = NO_BUILTIN_FIELDS,
) -> Config:
    """Validate and convert config bytes (``file`` is only used in messages)."""
    root = parse_root(data, file, "vhostmd")
    grammar = load_dtd(file, dtd)
    validate(root, file, grammar)
    config = _convert(root, file, builtin_fields)
    alarms, accounting = root.find("alarms"), root.find("accounting")
    policy = root.find("policy")
    if alarms is None and accounting is None and policy is None:
        return config
    # Their parsers (and perfmon's tables) are imported only by configs that have them.
    from vhostmd_py.config.accounting import parse_accounting
    from vhostmd_py.config.alarms import parse_alarms
    from vhostmd_py.config.policy import parse_policy

    return replace(
        config,
        alarms=parse_alarms(alarms, file, grammar) if alarms is not None else None,
        accounting=parse_accounting(accounting, file, grammar) if accounting is not None else None,
        policy=parse_policy(policy, file) if policy is not None else None,
    )


def _convert(root: etree._Element, file: str, builtin_fields: BuiltinFields) -> Config:
    globals_ = root.find("globals")
    assert globals_ is not None  # guaranteed by the DTD
    disk = globals_.find("disk")
    assert disk is not None
    disk_name = text_of(child(disk, "name"))
    path_of_disk = disk_path(disk)
    size = disk_size(disk, file)
    period_elem = child(globals_, "update_period")
    update_period = integer_in(
        text_of(period_elem), file, "update_period", line_of(period_elem),
        UPDATE_PERIOD_RANGE, " seconds", "update period",
    )
    path = text_of(child(globals_, "path")) or DEFAULT_PATH
    transports = parse_transports(globals_, file)
    virtio = parse_virtio(globals_, file, update_period)
    history = parse_history(globals_, file, update_period)
    # Default grace: the virtio expiration time (at least 3 update periods).
    disk_per_vm = parse_disk_per_vm(globals_, file, size, virtio.expiration_time)
    freshness = parse_freshness(globals_, file)
    endpoint = parse_endpoint(globals_, file)
    metrics = parse_metrics(root, file, builtin_fields)
    return Config(
        file=file,
        disk_name=disk_name,
        disk_path=path_of_disk,
        disk_size=size,
        update_period=update_period,
        path=path,
        transports=transports,
        virtio=virtio,
        metrics=metrics,
        history=history,
        disk_per_vm=disk_per_vm,
        freshness=freshness,
        metrics_endpoint=endpoint,
    )
