"""The two implementations of the disk format the wire tests compare, as namespaces.

"c": the host's compiled binding (vhostmd_py.publish.mdisk: checksum and
header in csrc/mdisk.c) and the C stable-read attempt the tests build
(helpers.cread, csrc/tests/mdisk_read.c). "py": the wire format's pure
Python (vhostmd_wire.disk), the oracle. Both read with the ONE retry policy
of vhostmd_wire.disk.DiskReader (only the read strategy differs) and both
publish with the host's C writer, the only writer there is. ``__name__``
names the writer's module for tests that publish in a child process.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from vhostmd_wire import disk as wire

WRITER_MODULE = "vhostmd_py.publish.mdisk"


def _readers(strategy: Any) -> dict[str, Any]:
    def read_disk(path: Any, **kwargs: Any) -> bytes:
        return wire.read_disk(path, strategy=strategy(), **kwargs)

    def disk_reader(path: Any, **kwargs: Any) -> wire.DiskReader:
        return wire.DiskReader(path, strategy=strategy(), **kwargs)

    return {"read_disk": read_disk, "DiskReader": disk_reader}


def _common() -> dict[str, Any]:
    names = ["SIGNATURE", "HEADER_SIZE", "MIN_DISK_SIZE", "MAX_DISK_SIZE", "UPSTREAM_READ_BLOCK"]
    out = {name: getattr(wire, name) for name in names}
    out.update(
        Header=wire.Header,
        read_header=wire.read_header,
        device_size=wire.device_size,
        __name__=WRITER_MODULE,
    )
    return out


def _impl(strategy: Any, functions: Any) -> SimpleNamespace:
    from vhostmd_py.publish import mdisk

    return SimpleNamespace(
        **_common(),
        **_readers(strategy),
        checksum=functions.checksum,
        pack_header=functions.pack_header,
        unpack_header=functions.unpack_header,
        MetricsDisk=mdisk.MetricsDisk,  # the only writer there is
    )


def c_impl() -> SimpleNamespace:
    """The C binding's functions with the wire's retry policy around C's read attempt."""
    from helpers.cread import CReadStrategy
    from vhostmd_py.publish import mdisk

    return _impl(CReadStrategy, mdisk)


def py_impl() -> SimpleNamespace:
    """The wire format's pure Python (the C writer publishes: there is no Python writer)."""
    return _impl(wire.PyReadStrategy, wire)
