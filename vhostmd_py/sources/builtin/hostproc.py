"""Host statistics from /proc, /sys and /etc/os-release, without a process.

Every root is a parameter so tests feed real temporary trees. A file that is
missing or unreadable gives empty values (the metrics that need it are left
out, logged once by the renderer), never an exception: the other host
metrics must still be published.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Tuple

from vhostmd_py.errors import StrPath

log = logging.getLogger(__name__)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        log.debug("cannot read %s: %s", path, err)
        return None


def parse_meminfo(text: str) -> Dict[str, int]:
    """``Key:   123 kB`` lines -> {Key: 123} (KiB; HugePages_* are counts)."""
    out: Dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and fields:
            try:
                out[key.strip()] = int(fields[0])
            except ValueError:
                continue
    return out


def parse_vmstat(text: str) -> Dict[str, int]:
    """``name value`` lines -> {name: value}."""
    out: Dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2:
            try:
                out[fields[0]] = int(fields[1])
            except ValueError:
                continue
    return out


CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest",
              "guest_nice")


def parse_stat_cpu(text: str) -> Dict[str, int]:
    """The aggregate ``cpu`` line of /proc/stat -> {user: ticks, nice: ..., ...}."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            try:
                return {k: int(v) for k, v in zip(CPU_FIELDS, fields[1:])}
            except ValueError:
                return {}
    return {}


def parse_loadavg(text: str) -> Tuple[float, float, float] | None:
    """The three load averages of /proc/loadavg."""
    fields = text.split()
    try:
        return (float(fields[0]), float(fields[1]), float(fields[2]))
    except (IndexError, ValueError):
        return None


def parse_cpu_list(text: str) -> int | None:
    """How many CPUs a kernel CPU list (``0-3,6,8-9``) names."""
    count = 0
    try:
        for part in text.strip().split(","):
            if not part:
                continue
            lo, _, hi = part.partition("-")
            count += (int(hi) - int(lo) + 1) if hi else 1
    except ValueError:
        return None
    return count or None


def parse_os_release(text: str) -> Dict[str, str]:
    """os-release(5) KEY=value lines, shell quoting of the simple kinds removed."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
            if line.split("=", 1)[1].strip()[0] == '"':
                for esc in ('\\"', "\\\\", "\\$", "\\`"):
                    value = value.replace(esc, esc[1])
        out[key.strip()] = value
    return out


class HostProc:
    """Reads the host's kernel counters; roots are parameters (tests use temporary trees)."""

    def __init__(
        self,
        *,
        proc_root: StrPath = "/proc",
        sys_root: StrPath = "/sys",
        os_release: StrPath = "/etc/os-release",
    ) -> None:
        self.proc = Path(proc_root)
        self.sys = Path(sys_root)
        self.os_release = Path(os_release)
        self._vendor: str | None = None
        self._vendor_read = False

    def meminfo(self) -> Dict[str, int]:
        """/proc/meminfo in KiB."""
        text = _read(self.proc / "meminfo")
        return parse_meminfo(text) if text is not None else {}

    def vmstat(self) -> Dict[str, int]:
        """/proc/vmstat counters."""
        text = _read(self.proc / "vmstat")
        return parse_vmstat(text) if text is not None else {}

    def cpu_ticks(self) -> Dict[str, int]:
        """/proc/stat's aggregate cpu line in USER_HZ ticks."""
        text = _read(self.proc / "stat")
        return parse_stat_cpu(text) if text is not None else {}

    def loadavg(self) -> Tuple[float, float, float] | None:
        """/proc/loadavg's three averages."""
        text = _read(self.proc / "loadavg")
        return parse_loadavg(text) if text is not None else None

    def online_cpus(self) -> int | None:
        """CPUs in /sys/devices/system/cpu/online."""
        text = _read(self.sys / "devices" / "system" / "cpu" / "online")
        return parse_cpu_list(text) if text is not None else None

    def vendor(self) -> str | None:
        """VENDOR_NAME of os-release, else NAME (read once: it changes with an upgrade only)."""
        if not self._vendor_read:
            text = _read(self.os_release)
            fields = parse_os_release(text) if text is not None else {}
            self._vendor = fields.get("VENDOR_NAME") or fields.get("NAME")
            self._vendor_read = True
        return self._vendor

    @staticmethod
    def nodename() -> str:
        """The host name as hostname(1) prints it."""
        return os.uname().nodename
