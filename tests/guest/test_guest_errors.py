"""Tests of vhostmd_guest.errors (import boundaries: tests/test_import_boundaries.py)."""

from __future__ import annotations

import inspect

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


def test_wire_errors_are_the_guest_errors() -> None:
    """The guest's disk and document errors ARE the wire format's: nothing is translated."""
    from vhostmd_wire import errors as wire

    assert MetricsError is wire.VhostmdError
    assert errors.MetricsDiskError is wire.DiskError
    assert errors.DiskChecksumError is wire.ChecksumError
    assert errors.DiskBusyTimeoutError is wire.DiskBusyError
    assert errors.DiskFormatError is wire.DiskFormatError
    assert errors.DiskIOError is wire.DiskIOError
    assert errors.DocumentError is wire.DocumentError
    assert issubclass(DiskNotFoundError, wire.DiskError)
    assert MetricNotFoundError("X", "host").reason == "no metric 'X' in context host"
