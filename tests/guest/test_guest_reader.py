"""Tests of vhostmd_guest.reader: stable reads, caching, VM choice, threads, fuzzed headers."""

from __future__ import annotations

import resource
import shutil
import struct
import threading
import time
from pathlib import Path
from typing import List

import pytest
from helpers.wiredisk import DiskWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vhostmd_guest.document import MetricContext
from vhostmd_guest.errors import (
    DiskBusyTimeoutError,
    DiskChecksumError,
    DiskFormatError,
    DocumentError,
    MetricNotFoundError,
    MetricsDiskError,
    MetricsError,
    VmIdentityError,
)
from vhostmd_guest.reader import (
    DiskSource,
    MetricsReader,
    detect_vm_uuid,
    fetch_disk_metrics,
    read_disk_content,
)
from vhostmd_wire import disk as wire

NODE10_UUIDS = [f"00000000-0000-4000-8000-{i:012d}" for i in range(1, 11)]


def write_image(
    path: Path,
    content: bytes,
    *,
    size: int = 65536,
    busy: int = 0,
    checksum: int | None = None,
    length: int | None = None,
    signature: int = wire.SIGNATURE,
) -> Path:
    """A metrics disk image with a header we choose (defaults: a valid one)."""
    header = wire.Header(
        signature,
        busy,
        wire.checksum(content) if checksum is None else checksum,
        len(content) if length is None else length,
    )
    raw = wire.pack_header(header) + content
    path.write_bytes(raw + b"\0" * max(0, size - len(raw)))
    return path


def _doc(*values: int) -> bytes:
    body = "".join(
        f"  <metric type='int32' context='host'>\n    <name>V{i}</name>\n"
        f"    <value>{v}</value>\n  </metric>\n"
        for i, v in enumerate(values)
    )
    return f"<metrics>\n{body}</metrics>\n".encode()


@pytest.fixture
def node10(tmp_path: Path, upstream: Path) -> Path:
    """A copy of the golden 10-VM disk on a filesystem with O_DIRECT."""
    dst = tmp_path / "node10-64k.img"
    shutil.copyfile(upstream / "disks" / "node10-64k.img", dst)
    return dst


def test_test_disks_are_read_with_o_direct(node10: Path) -> None:
    """The disks these tests use are read through O_DIRECT, the path a guest uses."""
    with wire.DiskReader(node10) as reader:
        assert reader.direct
        assert len(reader.read()) == 3780


def test_each_vm_of_node10_by_uuid(node10: Path) -> None:
    """On the 10-VM golden disk, each VM's metrics are found by its UUID."""
    for i, uuid in enumerate(NODE10_UUIDS, start=1):
        reader = MetricsReader(DiskSource(path=str(node10)), vm_uuid=uuid.upper())
        ident = reader.get("Ident", MetricContext.VM)
        assert ident.value == f"vm{i:04d}-{i}-{uuid}"
        assert ident.vm_id == i
        assert reader.get("VCpus", MetricContext.VM).value == 1
        assert reader.get("Answer").value == 42  # host metrics unaffected


def test_several_vms_without_uuid_is_a_clear_error(node10: Path, tmp_path: Path) -> None:
    """With 10 VMs and no UUID known, a vm lookup fails with VmIdentityError (host ones work)."""
    reader = MetricsReader(DiskSource(path=str(node10)), sys_root=tmp_path / "emptysys")
    assert reader.vm_uuid is None
    assert reader.get("Greeting").value == "hello"
    with pytest.raises(VmIdentityError) as info:
        reader.get("Ident", MetricContext.VM)
    assert sorted(info.value.uuids) == NODE10_UUIDS


def test_given_uuid_absent_is_an_error(node10: Path) -> None:
    """A caller-given UUID that is not on the disk is not silently replaced."""
    reader = MetricsReader(DiskSource(path=str(node10)), vm_uuid="12345678-0000-4000-8000-0")
    with pytest.raises(VmIdentityError):
        reader.get("Ident", MetricContext.VM)


def _sys_with(tmp_path: Path, rel: str, text: str) -> Path:
    root = tmp_path / "sys"
    f = root / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)
    return root


def test_uuid_from_dmi_lowercased(node10: Path, tmp_path: Path) -> None:
    """DMI product_uuid (upper case, as QEMU's SMBIOS shows it) selects the VM."""
    sys_root = _sys_with(tmp_path, "class/dmi/id/product_uuid", NODE10_UUIDS[6].upper() + "\n")
    assert detect_vm_uuid(sys_root) == NODE10_UUIDS[6]
    reader = MetricsReader(DiskSource(path=str(node10)), sys_root=sys_root)
    assert reader.get("Ident", MetricContext.VM).vm_id == 7


def test_uuid_from_xen_hypervisor_file(tmp_path: Path) -> None:
    """Without DMI, /sys/hypervisor/uuid is used; junk in either is ignored."""
    sys_root = _sys_with(tmp_path, "hypervisor/uuid", NODE10_UUIDS[2] + "\n")
    assert detect_vm_uuid(sys_root) == NODE10_UUIDS[2]
    _sys_with(tmp_path, "class/dmi/id/product_uuid", "Not Settable\n")
    assert detect_vm_uuid(sys_root) == NODE10_UUIDS[2]
    (sys_root / "hypervisor" / "uuid").write_text("00000000-0000-0000-0000-000000000000\n")
    assert detect_vm_uuid(sys_root) is None


def test_single_vm_disk_needs_no_uuid(tmp_path: Path, upstream: Path) -> None:
    """A one-VM disk answers vm lookups even when the detected UUID does not match."""
    disk = tmp_path / "basic.img"
    shutil.copyfile(upstream / "disks" / "basic-64k.img", disk)
    sys_root = _sys_with(tmp_path, "class/dmi/id/product_uuid", NODE10_UUIDS[0])
    reader = MetricsReader(DiskSource(path=str(disk)), sys_root=sys_root)
    assert reader.get("VCpus", MetricContext.VM).value == 2


def test_first_call_works_and_cache_follows_content(tmp_path: Path) -> None:
    """The first get works; re-parse only when the content changes."""
    disk = DiskWriter.create(tmp_path / "vhostmd0", 65536)
    try:
        disk.publish(_doc(1))
        reader = MetricsReader(DiskSource(path=str(tmp_path / "vhostmd0")))
        assert reader.get("V0").value == 1  # upstream's first get_metric fails
        for _ in range(5):
            assert reader.get("V0").value == 1
        assert reader.parses == 1
        disk.publish(_doc(1))  # same bytes again: nothing to re-parse
        assert reader.get("V0").value == 1
        assert reader.parses == 1
        disk.publish(_doc(2))
        assert reader.get("V0").value == 2
        assert reader.parses == 2
        disk.publish(_doc(2, 3))
        assert reader.get("V1").value == 3
        assert reader.parses == 3
    finally:
        disk.close()


def test_cache_not_fooled_by_equal_checksum_and_length(tmp_path: Path) -> None:
    """Values 19 -> 28 keep the byte-sum checksum and the length: the new value is served."""
    disk = DiskWriter.create(tmp_path / "vhostmd0", 65536)
    try:
        disk.publish(_doc(19))
        reader = MetricsReader(DiskSource(path=str(tmp_path / "vhostmd0")))
        assert reader.get("V0").value == 19
        assert wire.checksum(_doc(19)) == wire.checksum(_doc(28))
        assert len(_doc(19)) == len(_doc(28))
        disk.publish(_doc(28))
        assert reader.get("V0").value == 28
        assert reader.parses == 2
    finally:
        disk.close()


def test_cache_not_fooled_by_same_checksum_other_length(tmp_path: Path) -> None:
    """A header with the cached checksum but another length is not served from the cache."""
    path = tmp_path / "disk"
    first = _doc(5)
    write_image(path, first)
    # A mismatch is retried as a possibly torn read until busy_timeout: keep it short.
    reader = MetricsReader(DiskSource(path=str(path), busy_timeout=0.2))
    assert reader.get("V0").value == 5
    second = first + b" "
    forged = wire.Header(wire.SIGNATURE, 0, wire.checksum(first), len(second))
    write_image(path, second, checksum=forged.checksum, length=forged.length)
    with pytest.raises(DiskChecksumError) as info:
        reader.get("V0")
    assert info.value.expected == wire.checksum(first)
    assert info.value.actual == wire.checksum(second)


def test_busy_disk_gives_up_in_bounded_time(tmp_path: Path, upstream: Path) -> None:
    """A stuck busy flag fails after busy_timeout (upstream retries forever)."""
    disk = tmp_path / "busy.img"
    shutil.copyfile(upstream / "reader" / "images" / "busy.img", disk)
    t0 = time.monotonic()
    with pytest.raises(DiskBusyTimeoutError) as info:
        read_disk_content(disk, busy_timeout=0.3)
    assert time.monotonic() - t0 < 3
    assert info.value.path == str(disk)
    # Raised by the wire format as the guest's own class: nothing translated it.
    assert info.value.__cause__ is None


def test_busy_cleared_by_writer_is_read(tmp_path: Path, upstream: Path) -> None:
    """A disk that stops being busy while we wait is read (golden busy-cleared case)."""
    disk = tmp_path / "busy.img"
    shutil.copyfile(upstream / "reader" / "images" / "busy.img", disk)
    good = (upstream / "reader" / "images" / "good.img").read_bytes()

    def clear() -> None:
        time.sleep(0.3)
        with open(disk, "r+b") as f:
            f.write(good[:16])

    t = threading.Thread(target=clear)
    t.start()
    content = read_disk_content(disk, busy_timeout=5)
    t.join()
    assert content == (upstream / "reader" / "cases" / "good-vbd" / "stdout.bin").read_bytes()


@pytest.mark.parametrize(
    ("image", "error"),
    [
        ("badsum.img", DiskChecksumError),
        ("badsig.img", DiskFormatError),
        ("len-over-file.img", DiskFormatError),
        ("len-huge.img", DiskFormatError),
        ("garbage.img", DocumentError),
        ("truncated-xml.img", DocumentError),
        ("len-zero.img", DocumentError),
        ("len-plus-100.img", DocumentError),
    ],
)
def test_broken_golden_images_fail_typed(
    tmp_path: Path, upstream: Path, image: str, error: type
) -> None:
    """Each broken golden image fails with its own typed error."""
    disk = tmp_path / image
    shutil.copyfile(upstream / "reader" / "images" / image, disk)
    with pytest.raises(error):
        fetch_disk_metrics(DiskSource(path=str(disk), busy_timeout=0.2))


def test_small_disk_reads(tmp_path: Path, upstream: Path) -> None:
    """A 1 KiB disk reads fine (upstream needs 64 KiB)."""
    disk = tmp_path / "small.img"
    shutil.copyfile(upstream / "reader" / "images" / "small-1k.img", disk)
    _path, content = fetch_disk_metrics(DiskSource(path=str(disk)))
    assert len(content) == 751


def test_discovered_disk_and_rediscovery(tmp_path: Path, upstream: Path) -> None:
    """Without a path the disk is discovered; if it loses its signature, looked for again."""
    for name in ("vda", "vdb"):
        (tmp_path / "sys" / "block" / name).mkdir(parents=True)
        (tmp_path / "sys" / "block" / name / "size").write_text("128\n")
    (tmp_path / "dev").mkdir()
    write_image(tmp_path / "dev" / "vda", _doc(1))
    write_image(tmp_path / "dev" / "vdb", _doc(2))
    reader = MetricsReader(
        DiskSource(sys_root=str(tmp_path / "sys"), dev_root=str(tmp_path / "dev"))
    )
    assert reader.get("V0").value == 1
    write_image(tmp_path / "dev" / "vda", _doc(1), signature=0)
    assert reader.get("V0").value == 2


def test_threads_share_one_reader_while_host_publishes(tmp_path: Path) -> None:
    """Many threads reading while the host republishes see only whole documents."""
    disk = DiskWriter.create(tmp_path / "vhostmd0", 65536)
    disk.publish(_doc(0, 0))
    reader = MetricsReader(DiskSource(path=str(tmp_path / "vhostmd0"), busy_timeout=5))
    errors: List[BaseException] = []
    seen: List[int] = []
    stop = threading.Event()

    def read_loop() -> None:
        try:
            while not stop.is_set():
                doc = reader.read()
                a, b = (m.value for m in doc)
                assert a == b  # both values come from one publish
                seen.append(int(a))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=read_loop) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        for n in range(1, 60):
            disk.publish(_doc(n, n) + b" " * (n % 7))
            time.sleep(0.002)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        disk.close()
    assert not errors, errors[:3]
    assert len(set(seen)) > 1


def test_missing_metric_is_typed(tmp_path: Path) -> None:
    """Asking for an absent metric raises MetricNotFoundError."""
    reader = MetricsReader(DiskSource(path=str(write_image(tmp_path / "d", _doc(1)))))
    with pytest.raises(MetricNotFoundError):
        reader.get("Nope")
    assert [m.name for m in reader] == ["V0"]


# --- fuzzed headers and contents -------------------------------------------------


@pytest.fixture(scope="module")
def rss_before() -> int:
    """Peak RSS (KiB) of this process before the header fuzzing."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


_u32 = st.integers(min_value=0, max_value=2**32 - 1)


@settings(
    max_examples=120,
    deadline=3000,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    sig=st.sampled_from([wire.SIGNATURE, 0, 0x78766264]),
    busy=st.sampled_from([0, 0, 1, 2**32 - 1]),
    checksum=st.one_of(st.none(), _u32),
    length=st.one_of(st.none(), _u32, st.integers(min_value=0, max_value=5000)),
    content=st.binary(max_size=3000),
    size=st.sampled_from([0, 8, 16, 1024, 4096, 5000, 65536]),
)
def test_fuzz_headers_only_typed_errors(
    tmp_path: Path,
    rss_before: int,
    sig: int,
    busy: int,
    checksum: int | None,
    length: int | None,
    content: bytes,
    size: int,
) -> None:
    """Any header/content/size combination reads or fails typed, within the busy bound."""
    path = tmp_path / "fuzz.img"
    header = wire.pack_header(
        wire.Header(
            sig,
            busy,
            wire.checksum(content) if checksum is None else checksum,
            len(content) if length is None else length,
        )
    )
    raw = (header + content)[: max(size, 0)] if size else header + content
    if size > len(raw):
        raw += b"\0" * (size - len(raw))
    path.write_bytes(raw)
    t0 = time.monotonic()
    try:
        got_path, data = fetch_disk_metrics(DiskSource(path=str(path), busy_timeout=0.05))
    except MetricsError as err:
        assert isinstance(err, (MetricsDiskError, DocumentError))
    else:
        assert got_path == str(path)
        assert data == raw[16 : 16 + struct.unpack(">I", raw[12:16])[0]]
    assert time.monotonic() - t0 < 2
    # A length field of up to 4 GiB must never turn into an allocation.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 * 1024
