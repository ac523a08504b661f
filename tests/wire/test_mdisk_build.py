"""csrc/mdisk.c builds warning-free, and its portable (non-SSE2) checksum is right too."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

FFI = pytest.importorskip("cffi", reason="cffi is not installed (guest tier)").FFI
mdisk = pytest.importorskip("vhostmd_py.publish.mdisk", reason="the host package is not installed")


def _build(repo_root: Path, tmp_path: Path, name: str, *defines: str) -> Any:
    """Compile csrc/mdisk.c as the cffi module `name` with -Werror; its lib object."""
    csrc = repo_root / "csrc"
    ffi = FFI()
    ffi.cdef((csrc / "mdisk.h").read_text())
    ffi.set_source(
        name,
        '#include <stdint.h>\n#include <stddef.h>\n#include "mdisk.h"',
        sources=[str(csrc / "mdisk.c")],
        include_dirs=[str(csrc)],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-std=c99", "-D_GNU_SOURCE"]
        + [f"-D{d}" for d in defines],
    )
    so = ffi.compile(tmpdir=str(tmp_path))
    spec = importlib.util.spec_from_file_location(name, so)
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.lib


def _reference(data: bytes) -> int:
    return sum(b - 256 if b >= 0x80 else b for b in data) % 2**32


@pytest.mark.parametrize("defines", [(), ("MDISK_NO_SIMD",)], ids=["default", "portable"])
def test_checksum_variants(repo_root: Path, tmp_path: Path, defines: tuple[str, ...]) -> None:
    """Both checksum loops build with -Werror and agree with the reference at every length."""
    lib = _build(repo_root, tmp_path, f"_mdisk_check_{len(defines)}", *defines)
    data = bytes((i * 131 + 7) % 256 for i in range(5000))
    for length in [*range(0, 600), 4095, 4096, 4097, 5000]:
        chunk = data[:length]
        assert lib.mdisk_checksum(chunk, length) == _reference(chunk), length
    assert lib.mdisk_checksum(b"\x80" * 100000, 100000) == (-128 * 100000) % 2**32
    # and the installed extension is the same code
    assert mdisk.checksum(data) == lib.mdisk_checksum(data, len(data))
