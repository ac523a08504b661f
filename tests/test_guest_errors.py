"""Tests of vhostmd_guest.errors and of the guest package's import boundaries."""

from __future__ import annotations

import inspect
import subprocess
import sys

from vhostmd_guest import errors
from vhostmd_guest.errors import (
    DiskChecksumError,
    DiskNotFoundError,
    MetricNotFoundError,
    MetricsError,
    VirtioBusyError,
    VirtioTimeoutError,
)


def test_every_error_is_a_metrics_error() -> None:
    """One hierarchy: every exception class in the module derives from MetricsError."""
    classes = [
        c for _n, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Exception)
    ]
    assert len(classes) > 10
    assert all(issubclass(c, MetricsError) for c in classes)


def test_structured_fields_and_messages() -> None:
    """Fields are kept and the message names what failed."""
    err = DiskChecksumError("/dev/vdb", 0xE1BA, 0xE1B9)
    assert (err.path, err.expected, err.actual) == ("/dev/vdb", 0xE1BA, 0xE1B9)
    assert str(err) == (
        "metrics disk /dev/vdb: checksum mismatch: "
        "header says 0x0000e1ba, content sums to 0x0000e1b9"
    )
    nf = DiskNotFoundError("/sys", "/dev", ["vda (no signature)"])
    assert nf.probed == ("vda (no signature)",)
    assert str(nf) == (
        "no metrics disk found in /sys/block: no device with the mvbd signature found "
        "(probed: vda (no signature))"
    )
    assert "VM u-1" in str(MetricNotFoundError("X", "vm", "u-1"))
    busy = VirtioBusyError("/dev/vport0p1", "Device or resource busy", 16)
    assert busy.errno == 16
    assert "another process holds the port open" in str(busy)
    timeout = VirtioTimeoutError("/p", 5.0, 0)
    assert str(timeout).startswith("virtio port /p: no reply within 5 s")


_IMPORT_CHECK = """
import sys
sys.modules["libvirt"] = None  # any import of libvirt now fails
import vhostmd_guest, vhostmd_guest.cli, vhostmd_guest.libmetrics, vhostmd_guest.reader
import vhostmd_guest.discovery, vhostmd_guest.virtio, vhostmd_guest.xenstore
# The disk format, plus the two helpers shared with the host CLI and parser
# (they need only lxml and click, which a guest has anyway).
allowed = {"vhostmd_py", "vhostmd_py.mdisk", "vhostmd_py.errors", "vhostmd_py._mdisk",
           "vhostmd_py._mdisk.lib", "vhostmd_py.mdisk_py", "vhostmd_py.safexml",
           "vhostmd_py.getopt_wording"}
extra = sorted(m for m in sys.modules if m.startswith("vhostmd_py") and m not in allowed)
print("extra:", extra)
"""


def test_guest_imports_neither_libvirt_nor_host_modules() -> None:
    """The guest package works without libvirt and loads only the disk format from the host side."""
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "extra: []"
