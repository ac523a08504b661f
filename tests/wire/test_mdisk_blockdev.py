"""The metrics disk seen through a real block device (a loop device), as a guest sees it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Iterator, Tuple

import pytest
from helpers.mdisk_impls import c_impl, py_impl
from vhostmd_wire.errors import DiskIOError

pytest.importorskip("vhostmd_py.publish.mdisk", reason="the host package is not installed")


@pytest.fixture(params=[c_impl, py_impl], ids=["c", "py"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """The implementation under test: the C binding or the wire's pure Python."""
    module: ModuleType = request.param()
    return module


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Tuple[Path, str]]:
    """A 1 MiB backing file and the loop device over it (skipped where losetup is not allowed)."""
    backing = tmp_path / "backing.img"
    backing.write_bytes(bytes(1 << 20))
    if shutil.which("losetup") is None:
        pytest.skip("losetup not installed")
    proc = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot set up a loop device: {proc.stderr.strip()}")
    device = proc.stdout.strip()
    try:
        yield backing, device
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "fadvise"])
def test_guest_reads_fresh_data_through_block_device(
    impl: ModuleType, loop: Tuple[Path, str], direct: bool
) -> None:
    """The host republishes the backing file; the reader on the device sees each new document."""
    backing, device = loop
    with impl.MetricsDisk.create(backing, 1 << 20) as disk:
        disk.publish(b"first")
        # A plain buffered read caches the device's first block ...
        fd = os.open(device, os.O_RDONLY)
        try:
            assert os.pread(fd, 21, 0)[16:] == b"first"
            with impl.DiskReader(device, direct=direct) as reader:
                assert reader.direct is direct
                assert reader.read() == b"first"
                for doc in (b"second!!", b"3" * 5000, b"4"):
                    disk.publish(doc)
                    # ... and keeps serving a stale copy (why the guest uses
                    # O_DIRECT or drops the cache) ...
                    assert os.pread(fd, 16 + len(doc), 0)[16:] != doc
                    # ... while the stable read sees the new document.
                    assert reader.read() == doc
                    assert impl.read_disk(device, direct=direct) == doc
        finally:
            os.close(fd)
    assert impl.read_header(device).busy == 0


def test_device_size_of_block_device(impl: ModuleType, loop: Tuple[Path, str]) -> None:
    """BLKGETSIZE64 gives the loop device's size."""
    _, device = loop
    fd = os.open(device, os.O_RDONLY)
    try:
        assert impl.device_size(fd, device) == 1 << 20
    finally:
        os.close(fd)


def test_create_on_block_device(impl: ModuleType, loop: Tuple[Path, str]) -> None:
    """A block device is used in place: zeroed to the size, header busy=1, then published."""
    backing, device = loop
    backing.write_bytes(b"\xee" * (1 << 20))
    disk = impl.MetricsDisk.create(device, 65536)
    try:
        with open(device, "rb") as f:
            head = f.read(65536 + 16)
        assert head[:16] == impl.pack_header(impl.Header(impl.SIGNATURE, 1, 0, 0))
        assert head[16:65536] == bytes(65536 - 16)
        assert head[65536:] == b"\xee" * 16  # beyond the configured size: untouched
        disk.publish(b"<metrics>\n</metrics>\n")
        assert impl.read_disk(device) == b"<metrics>\n</metrics>\n"
    finally:
        disk.close()


def test_create_on_too_small_block_device(impl: ModuleType, loop: Tuple[Path, str]) -> None:
    """A device smaller than the configured size is a DiskIOError naming both sizes."""
    _, device = loop
    with pytest.raises(DiskIOError, match="1048576 bytes is smaller than 2097152"):
        impl.MetricsDisk.create(device, 2 << 20)
