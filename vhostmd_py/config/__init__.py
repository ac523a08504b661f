"""vhostmd.conf -> frozen, typed records, validated against the shipped DTD, once.

Our grammar (vhostmd_py/data/vhostmd.dtd) is upstream's with one relaxation
(``channel_path`` is optional in ``<virtio>``, so the README example loads),
``<source>`` as the alternative to ``<action>``, and optional extensions last
in ``<globals>`` (``<history>``, ``<metrics_endpoint>``, ``<disk_per_vm>``,
``<freshness>``) and after ``<metrics>`` (``<alarms>``, ``<accounting>``), so
every upstream config stays valid. docs/man/vhostmd.conf.5 is the reference.

The package, from the bottom up: ``units`` (the one grammar of integers,
sizes and durations, every range, the state directory default),
``document`` (the safe XML parse, DTD validation and element helpers),
``records`` (Config and every section's record), one module per section
(``disk``, ``transports``, ``history``, ``endpoint``, ``freshness``,
``metrics``, ``alarms``, ``accounting``) and ``load`` (load_config,
parse_config). Import from here; the modules are the layout, not the API.
"""

from __future__ import annotations

from typing import Sequence

from vhostmd_py.config.disk import DEFAULT_DISK_PATH
from vhostmd_py.config.document import default_dtd_path
from vhostmd_py.config.load import load_config, parse_config
from vhostmd_py.config.metrics import (
    CONTEXTS,
    METRIC_TYPES,
    NO_BUILTIN_FIELDS,
    BuiltinField,
    BuiltinFields,
)
from vhostmd_py.config.records import (
    DEFAULT_ENDPOINT_ADDRESS,
    DEFAULT_ENDPOINT_PORT,
    DEFAULT_IDENTITY_KEY,
    DEFAULT_MACHINE_ID,
    DEFAULT_PATH,
    DEFAULT_RETENTION,
    PERVM_UUID_TOKEN,
    AccountingConfig,
    AlarmsConfig,
    Budget,
    Config,
    EndpointConfig,
    FreshnessConfig,
    HistoryConfig,
    MetricSpec,
    PartialVariable,
    PerVmDiskConfig,
    Variable,
    VariableConfig,
    VirtioConfig,
    VmAlarms,
    VmBudget,
)
from vhostmd_py.config.transports import (
    DEFAULT_CHANNEL_PATH,
    DEFAULT_EXPIRATION_TIME,
    DEFAULT_MAX_CHANNELS,
    TRANSPORTS,
)
from vhostmd_py.config.units import (
    DEFAULT_STATE_DIR,
    DISK_SIZE_RANGE,
    ENDPOINT_PORT_RANGE,
    EXPIRATION_TIME_RANGE,
    MAX_CHANNELS_RANGE,
    PERVM_GRACE_RANGE,
    UPDATE_PERIOD_RANGE,
    parse_duration,
    parse_size,
)

__all__: Sequence[str] = (
    "CONTEXTS",
    "DEFAULT_CHANNEL_PATH",
    "DEFAULT_DISK_PATH",
    "DEFAULT_ENDPOINT_ADDRESS",
    "DEFAULT_ENDPOINT_PORT",
    "DEFAULT_EXPIRATION_TIME",
    "DEFAULT_IDENTITY_KEY",
    "DEFAULT_MACHINE_ID",
    "DEFAULT_MAX_CHANNELS",
    "DEFAULT_PATH",
    "DEFAULT_RETENTION",
    "DEFAULT_STATE_DIR",
    "DISK_SIZE_RANGE",
    "ENDPOINT_PORT_RANGE",
    "EXPIRATION_TIME_RANGE",
    "MAX_CHANNELS_RANGE",
    "METRIC_TYPES",
    "NO_BUILTIN_FIELDS",
    "PERVM_GRACE_RANGE",
    "PERVM_UUID_TOKEN",
    "TRANSPORTS",
    "UPDATE_PERIOD_RANGE",
    "AccountingConfig",
    "AlarmsConfig",
    "Budget",
    "BuiltinField",
    "BuiltinFields",
    "Config",
    "EndpointConfig",
    "FreshnessConfig",
    "HistoryConfig",
    "MetricSpec",
    "PartialVariable",
    "PerVmDiskConfig",
    "Variable",
    "VariableConfig",
    "VirtioConfig",
    "VmAlarms",
    "VmBudget",
    "default_dtd_path",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
)
