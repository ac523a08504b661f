"""The metrics disk on real files: the host's C binding against the wire format's pure Python."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace as ModuleType
from typing import List

import pytest
from helpers.mdisk_impls import c_impl, py_impl
from hypothesis import given, settings
from hypothesis import strategies as st
from vhostmd_wire import disk as mdisk_py
from vhostmd_wire.errors import (
    ChecksumError,
    ContentTooLargeError,
    DiskBusyError,
    DiskError,
    DiskFormatError,
    DiskIOError,
    DiskSizeError,
)

mdisk = pytest.importorskip("vhostmd_py.publish.mdisk", reason="the host package is not installed")
IMPLS = [c_impl(), py_impl()]
IMPL_IDS = ["c", "py"]

# Single-domain daemon images whose content is reproducible (FACTS.md section 2).
SINGLE_DOMAIN = [
    "basic-1k.img",
    "basic-64k.img",
    "edge-4k.img",
    "negsum-1k.img",
    "rawxml-1k.img",
    "utf8-1k.img",
]


@pytest.fixture(params=IMPLS, ids=IMPL_IDS)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """The implementation under test: the C binding or the pure-Python twin."""
    impl: ModuleType = request.param
    return impl


def signed_sum(data: bytes) -> int:
    """Reference checksum written from the docs' words, independent of both implementations."""
    return sum(b - 256 if b >= 0x80 else b for b in data) % 2**32


def header_of(path: Path) -> mdisk.Header:
    """The header of a file, decoded without any implementation under test."""
    raw = path.read_bytes()[:16]
    return mdisk.Header(*(int.from_bytes(raw[i : i + 4], "big") for i in range(0, 16, 4)))


class FakeClock:
    """A clock that only moves when slept on, to test timeouts without waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: List[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


# --- constants and the C/Python agreement --------------------------------------


def test_constants_match_between_c_and_python() -> None:
    """Both modules and mdisk.h agree on layout constants and status codes."""
    lib = mdisk.lib  # type: ignore[attr-defined]
    assert mdisk.SIGNATURE == mdisk_py.SIGNATURE == lib.MDISK_SIGNATURE == 0x6D766264
    assert mdisk.HEADER_SIZE == mdisk_py.HEADER_SIZE == lib.MDISK_HEADER_SIZE == 16
    assert mdisk.MAX_DISK_SIZE == mdisk_py.MAX_DISK_SIZE == lib.MDISK_MAX_DISK_SIZE
    assert mdisk.MIN_DISK_SIZE == 1024 and mdisk.UPSTREAM_READ_BLOCK == 65536
    assert mdisk.ALIGN == lib.MDISK_ALIGN
    for status in mdisk_py.Status:
        name = "MDISK_OK" if status.name == "OK" else f"MDISK_E_{status.name}"
        assert getattr(lib, name) == status.value, name


def test_public_names_are_the_same(impl: ModuleType) -> None:
    """The twin offers every name of the DESIGN.md interface."""
    for name in [
        "SIGNATURE",
        "HEADER_SIZE",
        "MIN_DISK_SIZE",
        "MAX_DISK_SIZE",
        "UPSTREAM_READ_BLOCK",
        "Header",
        "checksum",
        "pack_header",
        "unpack_header",
        "MetricsDisk",
        "read_disk",
        "read_header",
        "DiskReader",
    ]:
        assert hasattr(impl, name), name


# --- checksum --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "expected"),
    [("utf8-1k.img", 18185), ("negsum-1k.img", 0xFFFFA733), ("basic-1k.img", 57785)],
)
def test_checksum_matches_facts(
    impl: ModuleType, upstream: Path, image: str, expected: int
) -> None:
    """The checksums FACTS.md quotes (signed bytes, wrap modulo 2**32)."""
    raw = (upstream / "disks" / image).read_bytes()
    length = int.from_bytes(raw[12:16], "big")
    assert impl.checksum(raw[16 : 16 + length]) == expected


def test_checksum_is_signed_not_unsigned(impl: ModuleType) -> None:
    """Bytes >= 0x80 count negative: 0x80 alone sums to 2**32 - 128."""
    assert impl.checksum(b"") == 0
    assert impl.checksum(b"\x80") == 2**32 - 128
    assert impl.checksum(b"\xff\x01") == 0
    assert impl.checksum(b"\x7f") == 127


@pytest.mark.parametrize("length", [0, 1, 255, 256, 257, 511, 512, 513, 4096, 70001])
def test_checksum_block_boundaries(impl: ModuleType, length: int) -> None:
    """Lengths around the C code's 256-byte blocks agree with the reference."""
    data = bytes((i * 37 + 11) % 256 for i in range(length))
    assert impl.checksum(data) == signed_sum(data)
    assert impl.checksum(b"\xff" * length) == signed_sum(b"\xff" * length)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_checksum_property(data: bytes) -> None:
    """C, Python twin and the reference agree on arbitrary bytes."""
    assert mdisk.checksum(data) == mdisk_py.checksum(data) == signed_sum(data)


def test_checksum_accepts_buffers(impl: ModuleType) -> None:
    """bytearray and memoryview are summed like bytes."""
    data = b"\x80abc\xfe" * 100
    assert impl.checksum(bytearray(data)) == impl.checksum(memoryview(data)) == signed_sum(data)


# --- header ------------------------------------------------------------------------


def test_header_pack_layout(impl: ModuleType) -> None:
    """Four big-endian uint32: signature, busy, checksum, length."""
    h = impl.Header(0x6D766264, 1, 0xFFFFA733, 751)
    raw = impl.pack_header(h)
    assert raw == b"mvbd" + b"\0\0\0\x01" + b"\xff\xff\xa7\x33" + b"\0\0\x02\xef"
    assert impl.unpack_header(raw) == h


@settings(max_examples=200, deadline=None)
@given(st.tuples(*(st.integers(0, 2**32 - 1) for _ in range(4))))
def test_header_roundtrip_both(fields: tuple[int, int, int, int]) -> None:
    """pack/unpack round-trip and C and Python pack identically."""
    h = mdisk.Header(*fields)
    assert mdisk.pack_header(h) == mdisk_py.pack_header(h)
    assert mdisk.unpack_header(mdisk_py.pack_header(h)) == h
    assert mdisk_py.unpack_header(mdisk.pack_header(h)) == h


def test_header_rejects_out_of_range() -> None:
    """A field outside uint32 is refused when the Header is built."""
    with pytest.raises(ValueError, match="length"):
        mdisk.Header(mdisk.SIGNATURE, 0, 0, 2**32)
    with pytest.raises(ValueError, match="busy"):
        mdisk.Header(mdisk.SIGNATURE, -1, 0, 0)


def test_unpack_short_input(impl: ModuleType) -> None:
    """Fewer than 16 bytes is a DiskFormatError, not an IndexError."""
    with pytest.raises(DiskFormatError, match="16 header bytes"):
        impl.unpack_header(b"mvbd\0\0")


# --- golden images decode as FACTS.md says ---------------------------------------------

# image -> (file size, busy, checksum, length, checksum right?, non-zero bytes after content)
DISK_FACTS = {
    "basic-1k.img": (1024, 0, 57785, 751, True, 0),
    "basic-64k.img": (65536, 0, 57785, 751, True, 0),
    "edge-4k.img": (4096, 0, 0x1AB10, 1260, True, 0),
    "negsum-1k.img": (1024, 0, 0xFFFFA733, 375, True, 0),
    "rawxml-1k.img": (1024, 0, 0x25E8, 120, True, 0),
    "utf8-1k.img": (1024, 0, 18185, 240, True, 0),
    "node10-64k.img": (65536, 0, 0x3F9F6, 3780, True, 0),
    # Upstream never clears the stale tail: 751 - 605 = 146 bytes remain.
    "basic-1k.after-sigterm.img": (1024, 0, 0xB7D8, 605, True, 146),
    # Start-up state left forever: busy=1, sum 0, length 0.
    "toolarge-1k-with-node10.after-sigterm.img": (1024, 1, 0, 0, True, 0),
    "emptytok-1k.after-segfault.img": (1024, 1, 0, 0, True, 0),
}


def test_every_disk_image_is_described(upstream: Path) -> None:
    """No golden disk image is left out of the table below."""
    assert {p.name for p in (upstream / "disks").glob("*.img")} == set(DISK_FACTS)


@pytest.mark.parametrize("image", sorted(DISK_FACTS))
def test_golden_disk_decodes(impl: ModuleType, upstream: Path, image: str) -> None:
    """Header, checksum and tail of each daemon image are as FACTS.md says."""
    size, busy, total, length, sum_ok, stale = DISK_FACTS[image]
    path = upstream / "disks" / image
    raw = path.read_bytes()
    assert len(raw) == size
    h = impl.read_header(path)
    assert h == impl.unpack_header(raw)
    assert (h.signature, h.busy, h.checksum, h.length) == (impl.SIGNATURE, busy, total, length)
    assert h.has_signature
    assert (impl.checksum(raw[16 : 16 + length]) == total) is sum_ok
    assert len(raw[16 + length :].rstrip(b"\0")) == stale


def test_after_sigterm_stale_tail_is_old_content(upstream: Path) -> None:
    """The 146 stale bytes are the end of the previous 751-byte document."""
    old = (upstream / "disks" / "basic-1k.img").read_bytes()
    after = (upstream / "disks" / "basic-1k.after-sigterm.img").read_bytes()
    assert after[16 + 605 : 16 + 751] == old[16 + 605 : 16 + 751]


@pytest.mark.parametrize("image", SINGLE_DOMAIN)
def test_golden_disks_read_stably(impl: ModuleType, upstream: Path, image: str) -> None:
    """A stable read returns exactly the content bytes, including sub-64 KiB disks."""
    raw = (upstream / "disks" / image).read_bytes()
    length = int.from_bytes(raw[12:16], "big")
    assert impl.read_disk(upstream / "disks" / image) == raw[16 : 16 + length]


# --- publishing reproduces upstream byte for byte ------------------------------------------


@pytest.mark.parametrize("image", SINGLE_DOMAIN)
def test_publish_reproduces_golden_image(
    impl: ModuleType, upstream: Path, shm_dir: Path, image: str
) -> None:
    """Publishing the golden content into a fresh disk of its size gives the same file."""
    golden = (upstream / "disks" / image).read_bytes()
    content = golden[16 : 16 + int.from_bytes(golden[12:16], "big")]
    path = shm_dir / "vhostmd0"
    with impl.MetricsDisk.create(path, len(golden)) as disk:
        assert (disk.path, disk.size) == (str(path), len(golden))
        disk.publish(content)
        assert path.read_bytes() == golden


@pytest.mark.parametrize("image", SINGLE_DOMAIN)
def test_publish_after_longer_document_still_identical(
    impl: ModuleType, upstream: Path, shm_dir: Path, image: str
) -> None:
    """A longer previous document leaves no tail (a DEVIATION): file == golden."""
    golden = (upstream / "disks" / image).read_bytes()
    content = golden[16 : 16 + int.from_bytes(golden[12:16], "big")]
    path = shm_dir / "vhostmd0"
    with impl.MetricsDisk.create(path, len(golden)) as disk:
        disk.publish(b"\xa5" * (len(golden) - 16))
        disk.publish(b"short")
        disk.publish(content)
        assert path.read_bytes() == golden


def test_c_and_python_publish_identically(shm_dir: Path) -> None:
    """The same sequence of documents leaves identical files from both writers."""
    docs = [b"<metrics>\n" + bytes(range(256)) * 20, b"x", b"\x80" * 3000, b""]
    files = []
    for module in IMPLS:
        path = shm_dir / f"disk-{IMPLS.index(module)}"
        with module.MetricsDisk.create(path, 8192) as disk:
            for doc in docs:
                disk.publish(doc)
        files.append(path.read_bytes())
    assert files[0] == files[1]
    assert files[0][:16] == mdisk.pack_header(mdisk.Header(mdisk.SIGNATURE, 0, 0, 0))
    assert files[0][16:] == bytes(8192 - 16)


def test_stale_tail_is_cleared(impl: ModuleType, shm_dir: Path) -> None:
    """After a shorter publish, everything past the content is zero (upstream keeps it)."""
    path = shm_dir / "vhostmd0"
    with impl.MetricsDisk.create(path, 4096) as disk:
        disk.publish(b"L" * 3000)
        disk.publish(b"S" * 10)
        raw = path.read_bytes()
    assert raw[16:26] == b"S" * 10
    assert raw[26:] == bytes(4096 - 26)
    assert impl.read_disk(path) == b"S" * 10


# --- creation ---------------------------------------------------------------------------


def test_create_initial_state(impl: ModuleType, shm_dir: Path) -> None:
    """A new disk is size bytes of zeros with header busy=1, sum 0, length 0, mode 0644."""
    path = shm_dir / "made" / "vhostmd0"
    old_umask = os.umask(0o077)
    try:
        disk = impl.MetricsDisk.create(path, 64 * 1024)
    finally:
        os.umask(old_umask)
    try:
        raw = path.read_bytes()
        assert len(raw) == 65536
        assert header_of(path) == impl.Header(impl.SIGNATURE, 1, 0, 0)
        assert raw[16:] == bytes(65536 - 16)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert (path.parent.stat().st_mode & 0o777) == 0o755 & ~0o077
    finally:
        disk.close()


def test_create_truncates_existing(impl: ModuleType, shm_dir: Path) -> None:
    """An existing larger file with old content is truncated to the new size and zeroed."""
    path = shm_dir / "vhostmd0"
    path.write_bytes(b"\xff" * 10000)
    path.chmod(0o600)
    with impl.MetricsDisk.create(path, 2048):
        raw = path.read_bytes()
        assert len(raw) == 2048 and raw[16:] == bytes(2032)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("size", [0, -1, 1023, 256 * 1024 * 1024 + 1, 269484032])
def test_create_size_out_of_range(impl: ModuleType, shm_dir: Path, size: int) -> None:
    """Sizes outside 1024 .. 256 MiB are a DiskSizeError and create nothing."""
    path = shm_dir / "vhostmd0"
    with pytest.raises(DiskSizeError) as info:
        impl.MetricsDisk.create(path, size)
    assert info.value.size == size
    assert not path.exists()


def test_create_size_limits_accepted(impl: ModuleType, shm_dir: Path) -> None:
    """1024 bytes and 256 MiB (sparse on tmpfs) are both accepted."""
    for size in (1024, 256 * 1024 * 1024):
        path = shm_dir / f"d{size}"
        with impl.MetricsDisk.create(path, size) as disk:
            disk.publish(b"<metrics>\n</metrics>\n")
        assert path.stat().st_size == size
        assert impl.read_disk(path) == b"<metrics>\n</metrics>\n"
        path.unlink()


def test_create_missing_grandparent(impl: ModuleType, tmp_path: Path) -> None:
    """Only the last directory is created, like upstream (FACTS.md section 5 disk-dir-missing)."""
    with pytest.raises(DiskIOError) as info:
        impl.MetricsDisk.create(tmp_path / "a" / "b" / "vhostmd0", 1024)
    assert info.value.errno == errno.ENOENT
    assert not (tmp_path / "a").exists()


def test_create_on_directory(impl: ModuleType, tmp_path: Path) -> None:
    """A directory at the disk path is refused with EISDIR and left alone."""
    (tmp_path / "vhostmd0").mkdir()
    with pytest.raises(DiskIOError) as info:
        impl.MetricsDisk.create(tmp_path / "vhostmd0", 1024)
    assert info.value.errno == errno.EISDIR
    assert (tmp_path / "vhostmd0").is_dir()


def test_create_on_character_device(impl: ModuleType) -> None:
    """/dev/null is neither a regular file nor a block device: refused."""
    with pytest.raises(DiskIOError, match="not a regular file or block device"):
        impl.MetricsDisk.create("/dev/null", 1024)


def test_create_on_fifo(impl: ModuleType, tmp_path: Path) -> None:
    """A FIFO at the disk path is refused (and opening it does not hang)."""
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(DiskIOError, match="not a regular file"):
        impl.MetricsDisk.create(tmp_path / "fifo", 1024)


def test_create_unwritable_paths(impl: ModuleType, tmp_path: Path) -> None:
    """Parent is a file, sysfs, an immutable directory: each a DiskIOError with errno."""
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DiskIOError) as info:
        impl.MetricsDisk.create(tmp_path / "file" / "vhostmd0", 1024)
    assert info.value.errno == errno.ENOTDIR
    with pytest.raises(DiskIOError) as info:
        impl.MetricsDisk.create("/sys/vhostmd0", 1024)
    assert info.value.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    assert isinstance(info.value.__cause__, OSError)

    locked = tmp_path / "locked"
    locked.mkdir()
    if (
        shutil.which("chattr") is None
        or subprocess.run(
            ["chattr", "+i", str(locked)], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("cannot make an immutable directory here")
    try:
        with pytest.raises(DiskIOError) as info:
            impl.MetricsDisk.create(locked / "vhostmd0", 1024)
        assert info.value.errno == errno.EPERM
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


# --- publish: too large, busy never left set --------------------------------------------


def test_too_large_keeps_previous_document(impl: ModuleType, shm_dir: Path) -> None:
    """ContentTooLargeError leaves the old document readable and busy clear."""
    path = shm_dir / "vhostmd0"
    with impl.MetricsDisk.create(path, 1024) as disk:
        disk.publish(b"<metrics>old</metrics>\n")
        before = path.read_bytes()
        with pytest.raises(ContentTooLargeError) as info:
            disk.publish(b"x" * 1009)
        assert (info.value.length, info.value.capacity) == (1009, 1008)
        assert path.read_bytes() == before
        assert impl.read_disk(path) == b"<metrics>old</metrics>\n"
        disk.publish(b"y" * 1008)  # exactly full still fits
        assert impl.read_disk(path) == b"y" * 1008


def test_too_large_first_publish_then_close(impl: ModuleType, shm_dir: Path) -> None:
    """Before any publish busy stays set (creation, as upstream); close() clears it."""
    path = shm_dir / "vhostmd0"
    disk = impl.MetricsDisk.create(path, 1024)
    with pytest.raises(ContentTooLargeError):
        disk.publish(b"x" * 2000)
    assert header_of(path).busy == 1
    disk.close()
    assert header_of(path) == impl.Header(impl.SIGNATURE, 0, 0, 0)
    assert impl.read_disk(path) == b""
    disk.close()  # idempotent
    with pytest.raises(DiskIOError, match="closed"):
        disk.publish(b"late")


def test_close_after_publish_leaves_document(impl: ModuleType, shm_dir: Path) -> None:
    """Closing a published disk changes nothing on it."""
    path = shm_dir / "vhostmd0"
    disk = impl.MetricsDisk.create(path, 1024)
    disk.publish(b"doc")
    before = path.read_bytes()
    disk.close()
    assert path.read_bytes() == before and disk.closed


_FSIZE_SCRIPT = r"""
import errno, json, os, resource, signal, sys, importlib
from vhostmd_py.errors import DiskIOError
mod = importlib.import_module(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
disk = mod.MetricsDisk.create(sys.argv[2], 8192)
disk.publish(b"<old/>")
# From here on no write may reach offset 1000: the content write fails midway.
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
out = {}
try:
    disk.publish(b"n" * 3000)
except DiskIOError as err:
    out = {"errno": err.errno, "cause": type(err.__cause__).__name__}
print(json.dumps(out))
"""


def test_write_failure_midway_clears_busy(impl: ModuleType, tmp_path: Path) -> None:
    """A publish failing midway (RLIMIT_FSIZE, real process) raises and never leaves busy set."""
    path = tmp_path / "vhostmd0"
    proc = subprocess.run(
        [sys.executable, "-c", _FSIZE_SCRIPT, impl.__name__, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout.strip() == '{"errno": 27, "cause": "OSError"}'  # EFBIG
    h = header_of(path)
    assert (h.busy, h.length) == (0, 3000)
    # The half-written document fails the checksum: readers give up cleanly.
    clock = FakeClock()
    with pytest.raises(ChecksumError) as info:
        impl.read_disk(path, busy_timeout=0.2, retry_interval=0.1, clock=clock, sleep=clock.sleep)
    assert info.value.expected == h.checksum != info.value.actual


# --- stable reads of the upstream reader images ---------------------------------------------


def test_reader_good_and_padded_images(impl: ModuleType, upstream: Path) -> None:
    """good/utf8/negsum/rawxml images read to the content bytes upstream printed."""
    images = upstream / "reader" / "images"
    cases = upstream / "reader" / "cases"
    assert impl.read_disk(images / "good.img") == (cases / "good-vbd" / "stdout.bin").read_bytes()
    assert len(impl.read_disk(images / "good.img")) == 751
    assert (
        impl.read_disk(images / "utf8-1k-padded64k.img")
        == (cases / "utf8-vbd" / "stdout.bin").read_bytes()
    )
    # The reader does not judge XML: negsum/rawxml bytes come back as written.
    assert len(impl.read_disk(images / "negsum-1k-padded64k.img")) == 375
    assert b"a<b&c" in impl.read_disk(images / "rawxml-1k-padded64k.img")
    assert impl.read_disk(images / "garbage.img") == b"this is not xml\n"
    assert len(impl.read_disk(images / "truncated-xml.img")) == 100


def test_reader_small_disk_deviation(impl: ModuleType, upstream: Path) -> None:
    """small-1k.img reads fine (DEVIATION: upstream needs 64 KiB)."""
    images = upstream / "reader" / "images"
    assert impl.read_disk(images / "small-1k.img") == impl.read_disk(images / "good.img")


def test_reader_busy_times_out(impl: ModuleType, upstream: Path) -> None:
    """busy.img: DiskBusyError after busy_timeout (upstream retries forever)."""
    clock = FakeClock()
    with pytest.raises(DiskBusyError) as info:
        impl.read_disk(
            upstream / "reader" / "images" / "busy.img",
            busy_timeout=1.0,
            retry_interval=0.25,
            clock=clock,
            sleep=clock.sleep,
        )
    assert clock.sleeps == [0.25] * 4
    assert info.value.waited == 1.0


def test_reader_busy_real_clock(impl: ModuleType, upstream: Path) -> None:
    """With the real clock the busy timeout is honoured, not exceeded by much."""
    start = time.monotonic()
    with pytest.raises(DiskBusyError):
        impl.read_disk(upstream / "reader" / "images" / "busy.img", busy_timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 5.0


def test_reader_busy_cleared_by_other_process(
    impl: ModuleType, upstream: Path, tmp_path: Path
) -> None:
    """busy=1 cleared by another process after 0.5 s: the read then succeeds."""
    path = tmp_path / "busy.img"
    shutil.copyfile(upstream / "reader" / "images" / "busy.img", path)
    clearer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time; time.sleep(0.5); fd = os.open(sys.argv[1], os.O_WRONLY); "
            "os.pwrite(fd, bytes(4), 4)",
            str(path),
        ]
    )
    try:
        start = time.monotonic()
        content = impl.read_disk(path, busy_timeout=20.0)
        waited = time.monotonic() - start
    finally:
        clearer.wait(timeout=30)
    assert content == impl.read_disk(upstream / "reader" / "images" / "good.img")
    assert waited >= 0.3


def test_reader_bad_signature(impl: ModuleType, upstream: Path) -> None:
    """badsig.img: DiskFormatError at once, naming the signature."""
    with pytest.raises(DiskFormatError, match="0x78766264"):
        impl.read_disk(upstream / "reader" / "images" / "badsig.img")
    assert not impl.read_header(upstream / "reader" / "images" / "badsig.img").has_signature


def test_reader_bad_checksum(impl: ModuleType, upstream: Path) -> None:
    """badsum.img: ChecksumError after retrying (DEVIATION: upstream prints it)."""
    clock = FakeClock()
    with pytest.raises(ChecksumError) as info:
        impl.read_disk(
            upstream / "reader" / "images" / "badsum.img",
            busy_timeout=0.5,
            retry_interval=0.25,
            clock=clock,
            sleep=clock.sleep,
        )
    assert (info.value.expected, info.value.actual) == (0xE1BA, 0xE1B9)
    assert len(clock.sleeps) == 2


def test_reader_bad_checksum_gives_up_after_grace(impl: ModuleType, upstream: Path) -> None:
    """A checksum staying wrong under one header fails after checksum_grace, not busy_timeout."""
    clock = FakeClock()
    with pytest.raises(ChecksumError):
        impl.read_disk(
            upstream / "reader" / "images" / "badsum.img",
            busy_timeout=10.0,
            retry_interval=0.25,
            checksum_grace=1.0,
            clock=clock,
            sleep=clock.sleep,
        )
    assert clock.sleeps == [0.25] * 4


@pytest.mark.parametrize("image", ["len-over-file.img", "len-huge.img"])
def test_reader_length_beyond_file(impl: ModuleType, upstream: Path, image: str) -> None:
    """A length field beyond the file, or 0xffffffff, is a DiskFormatError at once."""
    clock = FakeClock()
    with pytest.raises(DiskFormatError, match="beyond the disk") as info:
        impl.read_disk(upstream / "reader" / "images" / image, clock=clock, sleep=clock.sleep)
    assert not isinstance(info.value, ChecksumError)
    assert clock.sleeps == []


def test_reader_length_plus_100(impl: ModuleType, upstream: Path) -> None:
    """len-plus-100: the extra bytes are zeros, the sum still matches: 851 bytes as upstream."""
    images = upstream / "reader" / "images"
    content = impl.read_disk(images / "len-plus-100.img")
    assert content == impl.read_disk(images / "good.img") + bytes(100)
    upstream_out = upstream / "reader" / "cases" / "len-plus-100-vbd" / "stdout.bin"
    assert content == upstream_out.read_bytes()


def test_reader_length_zero(impl: ModuleType, upstream: Path) -> None:
    """len-zero: an empty document (the guest tool decides that is an error)."""
    assert impl.read_disk(upstream / "reader" / "images" / "len-zero.img") == b""


READER_IMAGES = [
    "badsig",
    "badsum",
    "busy",
    "garbage",
    "good",
    "len-huge",
    "len-over-file",
    "len-plus-100",
    "len-zero",
    "negsum-1k-padded64k",
    "rawxml-1k-padded64k",
    "small-1k",
    "truncated-xml",
    "utf8-1k-padded64k",
]


def test_every_reader_image_is_listed(upstream: Path) -> None:
    """No reader image is left out of READER_IMAGES."""
    found = {p.name for p in (upstream / "reader" / "images").glob("*.img")}
    assert found == {f"{name}.img" for name in READER_IMAGES}


@pytest.mark.parametrize("name", READER_IMAGES)
def test_reader_images_headers(impl: ModuleType, upstream: Path, name: str) -> None:
    """read_header gives the raw header of every reader image, whatever its state."""
    path = upstream / "reader" / "images" / f"{name}.img"
    assert impl.read_header(path) == header_of(path)


# --- bad input on the reading side --------------------------------------------------------------


def test_read_zero_length_file(impl: ModuleType, tmp_path: Path) -> None:
    """An empty file: DiskFormatError from read_disk and read_header."""
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(DiskFormatError, match="shorter than the 16-byte header"):
        impl.read_disk(path)
    with pytest.raises(DiskFormatError, match="shorter than the 16-byte header"):
        impl.read_header(path)


def test_read_truncated_header(impl: ModuleType, upstream: Path, tmp_path: Path) -> None:
    """A file cut inside the header is a DiskFormatError."""
    path = tmp_path / "cut"
    path.write_bytes((upstream / "disks" / "basic-1k.img").read_bytes()[:10])
    with pytest.raises(DiskFormatError):
        impl.read_disk(path)
    with pytest.raises(DiskFormatError):
        impl.read_header(path)


def test_read_truncated_content(impl: ModuleType, upstream: Path, tmp_path: Path) -> None:
    """A file cut inside the content: the length goes beyond it, DiskFormatError."""
    path = tmp_path / "cut"
    path.write_bytes((upstream / "disks" / "basic-1k.img").read_bytes()[:500])
    with pytest.raises(DiskFormatError, match="751 goes beyond the disk's 500 bytes"):
        impl.read_disk(path)
    assert impl.read_header(path).length == 751


def test_read_directory(impl: ModuleType, tmp_path: Path) -> None:
    """A directory is a DiskIOError (EISDIR), for the reader and the probe."""
    with pytest.raises(DiskIOError) as info:
        impl.read_disk(tmp_path)
    assert info.value.errno == errno.EISDIR
    with pytest.raises(DiskIOError):
        impl.read_header(tmp_path)


def test_read_missing_file(impl: ModuleType, tmp_path: Path) -> None:
    """No such file: DiskIOError with ENOENT, chained to the OSError."""
    with pytest.raises(DiskIOError) as info:
        impl.read_disk(tmp_path / "nothing")
    assert info.value.errno == errno.ENOENT
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_read_character_device(impl: ModuleType) -> None:
    """/dev/zero is not a disk: DiskIOError rather than reading zeros."""
    with pytest.raises(DiskIOError, match="not a regular file or block device"):
        impl.read_disk("/dev/zero")


def test_read_fifo_does_not_hang(impl: ModuleType, tmp_path: Path) -> None:
    """A FIFO with no writer is refused at once instead of blocking the open."""
    os.mkfifo(tmp_path / "fifo")
    # In a child process, so that a regression fails by timeout, not a hung suite.
    script = (
        "import importlib, sys\n"
        "from vhostmd_wire.errors import DiskIOError\n"
        "mod = importlib.import_module('vhostmd_wire.disk')\n"
        "for fn in (mod.read_disk, mod.read_header):\n"
        "    try:\n"
        "        fn(sys.argv[2])\n"
        "    except DiskIOError as err:\n"
        "        print(err.reason)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, impl.__name__, str(tmp_path / "fifo")],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert proc.stdout.splitlines() == ["not a regular file or block device"] * 2


def test_errors_share_the_hierarchy() -> None:
    """Every disk error is a DiskError carrying the path."""
    for cls in (ChecksumError, ContentTooLargeError, DiskBusyError, DiskFormatError, DiskIOError):
        assert issubclass(cls, DiskError)


# --- the page-cache fallback and buffer handling -----------------------------------------


def test_read_without_o_direct(impl: ModuleType, shm_dir: Path) -> None:
    """direct=False (O_DIRECT refused) reads through the cache after dropping it."""
    path = shm_dir / "vhostmd0"
    with (
        impl.MetricsDisk.create(path, 65536) as disk,
        impl.DiskReader(path, direct=False) as reader,
    ):
        assert not reader.direct
        for doc in (b"first", b"second document", b"3" * 40000, b"4"):
            disk.publish(doc)
            assert reader.read() == doc
        assert impl.read_header(path, direct=False).length == 1


def test_reader_uses_o_direct(impl: ModuleType, shm_dir: Path, tmp_path: Path) -> None:
    """On ext4 and on tmpfs (Linux >= 6.6) the reader really opens with O_DIRECT."""
    for base in (shm_dir, tmp_path):
        path = base / "vhostmd0"
        with impl.MetricsDisk.create(path, 4096) as disk:
            disk.publish(b"doc")
        try:
            with impl.DiskReader(path) as reader:
                assert reader.read() == b"doc"
                opened_direct = reader.direct
        finally:
            path.unlink()
        if base is tmp_path:
            assert opened_direct


def test_reader_follows_growing_and_shrinking_documents(impl: ModuleType, shm_dir: Path) -> None:
    """One reader, documents from 0 bytes to 256 KiB and back, each read exactly."""
    path = shm_dir / "vhostmd0"
    sizes = [0, 1, 4079, 4080, 4081, 70000, 256 * 1024, 10, 256 * 1024 + 5, 3]
    with impl.MetricsDisk.create(path, 1024 * 1024) as disk, impl.DiskReader(path) as reader:
        for i, n in enumerate(sizes):
            doc = bytes([65 + i]) * n
            disk.publish(doc)
            assert reader.read() == doc
            assert impl.read_disk(path) == doc


def test_reader_closed(impl: ModuleType, shm_dir: Path) -> None:
    """Reading after close() is a DiskIOError, not a crash on a freed buffer."""
    path = shm_dir / "vhostmd0"
    with impl.MetricsDisk.create(path, 1024) as disk:
        disk.publish(b"x")
    reader = impl.DiskReader(path)
    reader.close()
    reader.close()
    with pytest.raises(DiskIOError, match="closed"):
        reader.read()


def test_c_publish_matches_the_wire_oracle(shm_dir: Path) -> None:
    """Each C publish leaves exactly the image vhostmd_wire.disk.published_image computes,
    and both read strategies read it back."""
    docs = [
        b"<metrics>\n" + "h\u00e9llo \u00ff\u00ff\u00ff".encode() * 500 + b"</metrics>\n",
        b"<metrics>\n</metrics>\n",
        b"<metrics>\n" + b"x" * 9000 + b"</metrics>\n",
        b"<metrics>\n" + b"y" * 100 + b"</metrics>\n",
    ]
    path = shm_dir / "vhostmd0"
    with mdisk.MetricsDisk.create(path, 65536) as disk:
        image = path.read_bytes()
        assert image == mdisk_py.created_image(65536)
        prev = 0
        for doc in docs:
            disk.publish(doc)
            image = mdisk_py.published_image(image, doc, prev)
            prev = len(doc)
            assert path.read_bytes() == image
            for impl in IMPLS:
                assert impl.read_disk(path) == doc


def test_create_refuses_a_symlink(impl: ModuleType, tmp_path: Path) -> None:
    """A symlink at the disk path is refused and its target left untouched (root in /dev/shm)."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "vhostmd0"
    link.symlink_to(victim)
    with pytest.raises(DiskIOError, match="symbolic link"):
        impl.MetricsDisk.create(link, 4096)
    assert victim.read_bytes() == b"precious"


def test_recreate_over_old_disk_shows_busy_then_zeros(impl: ModuleType, tmp_path: Path) -> None:
    """Re-creating over a published disk leaves busy=1, length 0 and zeros after the header."""
    path = tmp_path / "vhostmd0"
    with impl.MetricsDisk.create(path, 4096) as disk:
        disk.publish(b"<metrics>\n</metrics>\n" * 10)
    again = impl.MetricsDisk.create(path, 4096)
    try:
        raw = path.read_bytes()
        assert len(raw) == 4096
        header = impl.unpack_header(raw[:16])
        assert (header.busy, header.length, header.checksum) == (1, 0, 0)
        assert raw[16:] == bytes(4096 - 16)
    finally:
        again.close()
