"""Tests of vhostmd_guest.discovery against temporary /sys and /dev trees."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path
from typing import List

import pytest
from vhostmd_guest.discovery import find_metrics_disk, probe
from vhostmd_guest.errors import DiskIOError, DiskNotFoundError, MetricsDiskError


def _device(root: Path, name: str, sectors: int | None) -> Path:
    """A /sys/block entry (with a size file unless sectors is None); returns the /dev path."""
    entry = root / "sys" / "block" / name
    entry.mkdir(parents=True)
    if sectors is not None:
        (entry / "size").write_text(f"{sectors}\n")
    (root / "dev").mkdir(exist_ok=True)
    return root / "dev" / name


def _tree(root: Path, good: Path) -> Path:
    """Decoys (empty CD-ROM FIFO, FIFO disk, zero disk, directory) plus the metrics disk."""
    _device(root, "loop0", 0)  # no /dev node at all, size 0
    sda = _device(root, "sda", 16)
    sda.write_bytes(b"\0" * 8192)
    os.mkfifo(_device(root, "sr0", 0))  # size 0: never opened
    os.mkfifo(_device(root, "vda", 8))  # would block a plain open(O_RDONLY)
    _device(root, "vdc", 8).mkdir()  # a directory cannot be a disk
    vdd = _device(root, "vdd", 8)
    shutil.copyfile(good, vdd)
    return vdd


def _run_with_deadline(fn, seconds: float = 10.0):  # type: ignore[no-untyped-def]
    result: List[object] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as err:  # reported to the test thread
            result.append(err)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "discovery hung"
    return result[0]


def test_tmp_path_supports_o_direct(tmp_path: Path) -> None:
    """The tests' disks live where O_DIRECT works, so the real guest read path runs."""
    f = tmp_path / "probe"
    f.write_bytes(b"\0" * 4096)
    fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
    os.close(fd)


def test_finds_signature_among_decoys(tmp_path: Path, upstream: Path) -> None:
    """FIFOs, empty media, directories and zeroed disks are skipped without hanging."""
    vdd = _tree(tmp_path, upstream / "reader" / "images" / "good.img")
    found = _run_with_deadline(lambda: find_metrics_disk(tmp_path / "sys", tmp_path / "dev"))
    assert found == str(vdd)


def test_first_device_in_sorted_order_wins(tmp_path: Path, upstream: Path) -> None:
    """With two metrics disks the first /sys/block entry in sorted order is used."""
    good = upstream / "reader" / "images" / "good.img"
    for name in ("vdz", "vdb"):
        shutil.copyfile(good, _device(tmp_path, name, 128))
    assert find_metrics_disk(tmp_path / "sys", tmp_path / "dev") == str(tmp_path / "dev" / "vdb")


def test_bad_signature_and_missing_node_reported(tmp_path: Path, upstream: Path) -> None:
    """No signature anywhere: DiskNotFoundError lists what was probed and why."""
    shutil.copyfile(upstream / "reader" / "images" / "badsig.img", _device(tmp_path, "vda", 128))
    _device(tmp_path, "vdb", 128)  # listed in /sys, no /dev node
    with pytest.raises(DiskNotFoundError) as info:
        find_metrics_disk(tmp_path / "sys", tmp_path / "dev")
    err = info.value
    assert isinstance(err, MetricsDiskError)
    assert err.probed == ("vda (no signature)", "vdb (No such file or directory)")
    assert "no metrics disk found" in str(err)


def test_no_sys_block_at_all(tmp_path: Path) -> None:
    """A missing /sys/block is 'not found', not a crash."""
    with pytest.raises(DiskNotFoundError) as info:
        find_metrics_disk(tmp_path / "nosys", tmp_path / "nodev")
    assert info.value.probed == ()


def test_missing_size_file_still_probed_and_tiny_file_skipped(
    tmp_path: Path, upstream: Path
) -> None:
    """Without a size file the device is probed; a file shorter than a header is skipped."""
    _device(tmp_path, "vda", None).write_bytes(b"mvbd")
    small = upstream / "reader" / "images" / "small-1k.img"
    shutil.copyfile(small, _device(tmp_path, "vdb", None))
    assert find_metrics_disk(tmp_path / "sys", tmp_path / "dev") == str(tmp_path / "dev" / "vdb")


def test_probe_on_tmpfs(upstream: Path) -> None:
    """On tmpfs (O_DIRECT refused before Linux 6.6, accepted after) the probe reads the header."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    target = shm / f"vhostmd-guest-test-{os.getpid()}.img"
    shutil.copyfile(upstream / "reader" / "images" / "good.img", target)
    try:
        header = probe(target)
    finally:
        target.unlink()
    assert header is not None
    assert header.length == 751


def test_probe_reads_real_block_device_if_any() -> None:
    """A real block device of this machine is probed without error (no signature expected)."""
    candidates = [p for p in ("/dev/vda", "/dev/sda", "/dev/nvme0n1") if os.path.exists(p)]
    if not candidates:
        pytest.skip("no block device here")
    try:
        header = probe(candidates[0])
    except DiskIOError as err:
        if err.errno not in (errno.EACCES, errno.EPERM):
            raise
        pytest.skip("no permission to read the block device")
    assert header is None
