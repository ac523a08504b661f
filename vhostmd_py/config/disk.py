"""``<disk>`` (the shared metrics disk) and ``<disk_per_vm>`` (one disk per running VM)."""

from __future__ import annotations

import logging
import os

from lxml import etree
from vhostmd_wire.disk import UPSTREAM_READ_BLOCK

from vhostmd_py.config.document import child, line_of, text_of
from vhostmd_py.config.records import PERVM_UUID_TOKEN, PerVmDiskConfig
from vhostmd_py.config.units import (
    DISK_SIZE_RANGE,
    INTEGER,
    PERVM_GRACE_RANGE,
    duration_of,
    shown,
    size_factor,
    too_long,
)
from vhostmd_py.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_DISK_PATH = "/dev/shm/vhostmd0"


def disk_path(disk: etree._Element) -> str:
    """``<disk><path>``, the default when empty."""
    return text_of(child(disk, "path")) or DEFAULT_DISK_PATH


def disk_size(disk: etree._Element, file: str) -> int:
    """``<disk><size unit=>`` in bytes (a warning when upstream's guests cannot read it)."""
    elem = child(disk, "size")
    size = size_of(text_of(elem), str(elem.get("unit", "")), elem, file)
    if size < UPSTREAM_READ_BLOCK:
        log.warning(
            "%s:%s: metrics disk size %d is smaller than %d bytes: upstream guest readers "
            "(vm-dump-metrics, libmetrics) cannot read it",
            file,
            line_of(elem),
            size,
            UPSTREAM_READ_BLOCK,
        )
    return size


def size_of(raw: str, unit: str, elem: etree._Element, file: str) -> int:
    """RAW times UNIT in bytes, within the disk limits, else ConfigError at ELEM's line."""
    low, high = DISK_SIZE_RANGE
    if not INTEGER.match(raw):
        raise ConfigError(
            file,
            f"disk size '{shown(raw)}' is not an integer "
            f"(allowed: {low} to {high} bytes, with unit k or m)",
            line_of(elem),
        )
    if too_long(raw):
        raise ConfigError(
            file,
            f"Specified metrics disk size ({shown(raw)}) not within supported range: "
            f"({low} - {high})",
            line_of(elem),
        )
    number = int(raw, 10)
    factor = size_factor(unit)
    if factor is None:
        # Upstream reports -1 for an unknown unit (daemon-cli/size-bad-unit);
        # keep its wording and say why. The units named are the ones that fit
        # the range; the others of the size grammar are accepted too.
        raise ConfigError(
            file,
            f"Specified metrics disk size (-1) not within supported range: "
            f"({low} - {high}) (unknown unit '{unit}': use k, K, m, M "
            f"or an empty unit for bytes)",
            line_of(elem),
        )
    size = number * factor
    if not low <= size <= high:
        raise ConfigError(
            file,
            f"Specified metrics disk size ({size}) not within supported range: "
            f"({low} - {high})",
            line_of(elem),
        )
    return size


def parse_disk_per_vm(
    globals_: etree._Element, file: str, disk_size: int, grace: int
) -> PerVmDiskConfig | None:
    """``<disk_per_vm>``, None when absent; size and grace default to the given ones."""
    elem = globals_.find("disk_per_vm")
    if elem is None:
        return None
    line = line_of(elem)
    path = str(elem.get("path", "")).strip()
    where = f"disk_per_vm path '{path}'"
    if not os.path.isabs(path) or os.path.normpath(path) != path:
        raise ConfigError(file, f"{where} is not a normalised absolute path", line)
    directory, name = os.path.split(path)
    if name.count(PERVM_UUID_TOKEN) != 1 or "%" in directory:
        raise ConfigError(
            file, f"{where} must hold {PERVM_UUID_TOKEN} (the VM's UUID) exactly once, "
            "in its last component", line,
        )
    if "%" in name.replace(PERVM_UUID_TOKEN, ""):
        raise ConfigError(
            file, f"{where}: only {PERVM_UUID_TOKEN} (the VM's UUID) may be substituted", line
        )
    if directory == "/":
        raise ConfigError(file, f"{where}: the disks need a directory of their own", line)
    size = disk_size
    raw = elem.get("size")
    if raw is not None:
        size = size_of(str(raw).strip(), str(elem.get("unit", "")), elem, file)
    elif elem.get("unit") is not None:
        raise ConfigError(file, "disk_per_vm unit given without a size", line)
    raw = elem.get("grace")
    if raw is not None:
        grace = duration_of(str(raw), file, line, "disk_per_vm grace")
        low, high = PERVM_GRACE_RANGE
        if not low <= grace <= high:
            raise ConfigError(
                file, f"disk_per_vm grace {grace} is out of range (allowed: {low} to {high} "
                "seconds)", line,
            )
    return PerVmDiskConfig(path=path, size=size, grace=grace)
