"""C's stable-read attempt (csrc/tests/mdisk_read.c), built here for the tests and benchmarks.

The shipped extension (vhostmd_py.publish._mdisk) holds only what the host
runs; the guest reads in pure Python. The C read exists so the tests can
check the two against each other and the benchmarks can compare them, so
it is compiled on first use (csrc/mdisk.c + csrc/tests/mdisk_read.c, with
-Werror) into build/test-c/<hash of the sources>/ of the checkout, reused
by later runs, child processes and benchmarks until a source changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

from vhostmd_wire.disk import ALIGN, HEADER_SIZE, AttemptResult, Header, Status

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
SOURCES = (CSRC / "mdisk.h", CSRC / "mdisk.c", CSRC / "tests" / "mdisk_read.h",
           CSRC / "tests" / "mdisk_read.c")
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-std=c99", "-D_GNU_SOURCE"]
MODULE = "_mdisk_read_test"


def _digest() -> str:
    h = hashlib.sha256()
    for path in SOURCES:
        h.update(path.read_bytes())
    h.update(" ".join(CFLAGS).encode())
    return h.hexdigest()[:16]


def _compile(into: Path) -> Path:
    from cffi import FFI

    ffi = FFI()
    ffi.cdef((CSRC / "mdisk.h").read_text() + (CSRC / "tests" / "mdisk_read.h").read_text())
    ffi.set_source(
        MODULE,
        '#include <stdint.h>\n#include <stddef.h>\n#include "mdisk.h"\n#include "mdisk_read.h"',
        sources=[str(CSRC / "mdisk.c"), str(CSRC / "tests" / "mdisk_read.c")],
        include_dirs=[str(CSRC), str(CSRC / "tests")],
        extra_compile_args=CFLAGS,
    )
    return Path(ffi.compile(tmpdir=str(into)))


def _load(so: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE, so)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build() -> ModuleType:
    """The compiled test module (ffi, lib), built once per source version (under a lock)."""
    root = REPO / "build" / "test-c"
    root.mkdir(parents=True, exist_ok=True)
    done = root / _digest()
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test processes build it once
        if not done.is_dir():
            work = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
            try:
                so = _compile(work)
                (work / "module").write_text(so.name)
                os.rename(work, done)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(work)
    return _load(done / (done / "module").read_text())


_built: ModuleType | None = None


def module() -> ModuleType:
    """build(), once per process."""
    global _built
    if _built is None:
        _built = build()
    return _built


class CReadStrategy:
    """mdisk_read_stable (csrc/tests/mdisk_read.c) as a strategy of vhostmd_wire.disk.DiskReader."""

    def __init__(self) -> None:
        mod = module()
        self._ffi, self._lib = mod.ffi, mod.lib
        self._ccap = 0
        self._chdr = self._ffi.new("struct mdisk_header *")
        self.alloc(ALIGN)

    def alloc(self, size: int) -> None:
        """Replace the buffer by a posix_memalign'd one of size bytes."""
        raw = self._lib.mdisk_buf_alloc(size)
        if raw == self._ffi.NULL:
            raise MemoryError(f"cannot allocate an aligned buffer of {size} bytes")
        if self._ccap:
            self.free()
        self._cbuf = self._ffi.gc(raw, self._lib.mdisk_buf_free)
        self._ccap = size

    def capacity(self) -> int:
        """The buffer's size in bytes."""
        return self._ccap

    def free(self) -> None:
        """Release the buffer."""
        if self._ccap:
            self._ffi.release(self._cbuf)
            self._ccap = 0

    def attempt(self, fd: int, direct: bool, dev_size: int, want: int) -> AttemptResult:
        """One attempt in C: (Status or -errno, header, content if OK or CHECKSUM)."""
        if not self._ccap:  # as PyReadStrategy's closed mmap: never C on a freed buffer
            raise ValueError("read attempt on a released buffer")
        ch = self._chdr
        rc = int(self._lib.mdisk_read_stable(fd, int(direct), dev_size, self._cbuf, want, ch))
        if rc < 0 or rc in (Status.SHORT, Status.ARG):
            return rc, None, None
        header = Header(int(ch.signature), int(ch.busy), int(ch.checksum), int(ch.length))
        if rc in (Status.OK, Status.CHECKSUM):
            return rc, header, self._ffi.buffer(self._cbuf + HEADER_SIZE, header.length)[:]
        return rc, header, None
