"""The grammar of vhostmd.conf's values, once: integers, sizes, durations, their ranges.

Every section reads its numbers here, so a ``1w`` or a ``10G`` means the same
in every element that takes a duration or a size (docs/man/vhostmd.conf.5,
section VALUES). The size and duration parsers raise ValueError, as int()
does; the section that read the text turns it into a ConfigError naming its
file and line (vhostmdctl into a usage error). The integer readers raise the
ConfigError themselves: their wording, and upstream's, names the range.
"""

from __future__ import annotations

import re
from typing import Dict, Tuple

from vhostmd_wire.disk import MAX_DISK_SIZE, MIN_DISK_SIZE

from vhostmd_py.errors import ConfigError

# Where the daemon keeps its state (<history>, <alarms>, <accounting> state_dir)
# and where vhostmdctl reads it.
DEFAULT_STATE_DIR = "/var/lib/vhostmd"

# --- integers ----------------------------------------------------------------------
# Upstream reads numbers with strtol/atoi: ASCII digits with an optional sign.
# Python's int() would also take "1_000" or Arabic-Indic digits; refuse those.
INTEGER = re.compile(r"[+-]?[0-9]+\Z")
# Longer digit strings are out of every range below: never convert them (no
# huge ints, no int()'s 4300-digit ValueError) and shorten them in messages.
MAX_DIGITS = 18

# Every integer of the config has a closed range, checked at load time, so a
# value the daemon cannot use is refused with file:line (and a SIGHUP to it
# keeps the running config) instead of failing later: an update_period of
# 10**309 used to pass --dump and raise OverflowError in the cycle schedule.
# The ranges are documented in docs/man/vhostmd.conf.5 (section LIMITS).
# update_period: upstream's minimum 1 s; at most one day (a longer period is
# not monitoring any more, and the schedule's float arithmetic stays exact).
UPDATE_PERIOD_RANGE = (1, 86400)
# max_channels: one open socket per VM; 65536 is far beyond the fds a process
# gets (the virtio transport also caps itself at what RLIMIT_NOFILE allows).
MAX_CHANNELS_RANGE = (1, 65536)
# expiration_time: raised to 3 x update_period anyway (upstream), so its
# maximum is three times the longest period.
EXPIRATION_TIME_RANGE = (1, 3 * UPDATE_PERIOD_RANGE[1])
# <size> times its unit: MIN_DISK_SIZE..MAX_DISK_SIZE bytes (upstream's range).
DISK_SIZE_RANGE = (MIN_DISK_SIZE, MAX_DISK_SIZE)
# grace: how long a gone VM's disk is kept (seconds); a restart or a
# migration back must not race its removal. Bounded like expiration_time.
PERVM_GRACE_RANGE = EXPIRATION_TIME_RANGE
ENDPOINT_PORT_RANGE = (0, 65535)  # 0: any free port


def too_long(raw: str) -> bool:
    """Whether the integer RAW has more significant digits than any range allows."""
    return len(raw.lstrip("+-").lstrip("0")) > MAX_DIGITS


def shown(raw: str) -> str:
    """RAW for a message; a 310-digit number is cut to its start and its length."""
    if len(raw) <= MAX_DIGITS + 2:
        return raw
    return f"{raw[:12]}...({len(raw)} characters)"


def integer(raw: str, file: str, what: str, line: int | None, low: int, high: int,
            unit: str) -> int:
    """RAW as an int at most HIGH, else ConfigError naming WHAT, the range and the line.

    The caller checks LOW, with upstream's wording where it has one.
    """
    allowed = f"allowed: {low} to {high}{unit}"
    if not INTEGER.match(raw):
        raise ConfigError(file, f"{what} '{shown(raw)}' is not an integer ({allowed})", line)
    if too_long(raw):
        raise ConfigError(file, f"{what} {shown(raw)} is out of range ({allowed})", line)
    value = int(raw, 10)
    if value > high:
        raise ConfigError(file, f"{what} {value} is out of range ({allowed})", line)
    return value


def integer_in(raw: str, file: str, what: str, line: int | None, bounds: Tuple[int, int],
               unit: str, below: str) -> int:
    """RAW as an int in BOUNDS; BELOW is upstream's wording for a value under the minimum."""
    low, high = bounds
    value = integer(raw, file, what, line, low, high, unit)
    if value < low:
        # Upstream's message first (golden daemon-cli/period-zero), then the range.
        raise ConfigError(
            file,
            f"Specified {below} ({value}) less than minimum supported ({low}) "
            f"(allowed: {low} to {high}{unit})",
            line,
        )
    return value


# --- sizes -------------------------------------------------------------------------
# A size is an integer followed by an optional unit: k, m, g or t (either case)
# for a power of 1024, alone or followed by B or iB ("512M", "512MiB"); B alone,
# or nothing, for bytes. <size> and <disk_per_vm> give the unit in their own
# attribute, the other sizes as a suffix; both read the same unit table.
_SIZE_UNIT = re.compile(r"([kKmMgGtT]?)(i?B)?\Z")
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_SIZE = re.compile(r"\s*([+-]?[0-9]+)\s*(\S*)\s*\Z")


def size_factor(unit: str) -> int | None:
    """Bytes per UNIT (see above), or None when UNIT is not a size unit."""
    match = _SIZE_UNIT.match(unit)
    if match is None:
        return None
    return int(1024 ** _POWERS[match.group(1).lower()])


def parse_size(text: str) -> int:
    """``1048576``, ``512M``, ``10GiB`` -> bytes (ValueError when TEXT is no size)."""
    match = _SIZE.match(text)
    factor = size_factor(match.group(2)) if match is not None else None
    if match is None or factor is None or too_long(match.group(1)):
        raise ValueError(f"'{text}' is not a size (an integer with k, M, G or T)")
    size = int(match.group(1), 10) * factor
    if size < 0:
        raise ValueError(f"'{text}' is not a size (it is negative)")
    return size


# --- durations ---------------------------------------------------------------------
# A duration is an integer of seconds followed by an optional unit: s, m
# (minutes), h, d or w (weeks); spaces around either are ignored.
DURATION_UNITS: Dict[str, int] = {
    "": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400,
}
_DURATION = re.compile(r"\s*([0-9]+)\s*([smhdw]?)\s*\Z")


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` -> seconds (ValueError otherwise)."""
    match = _DURATION.match(text)
    if match is None or too_long(match.group(1)):
        raise ValueError(f"'{text}' is not a duration (a number with s, m, h, d or w)")
    return int(match.group(1), 10) * DURATION_UNITS[match.group(2)]


def duration_of(raw: str, file: str, line: int | None, what: str) -> int:
    """The duration RAW of attribute WHAT in seconds, else ConfigError ``WHAT: reason``."""
    try:
        return parse_duration(raw)
    except ValueError as err:
        raise ConfigError(file, f"{what}: {err}", line) from err
