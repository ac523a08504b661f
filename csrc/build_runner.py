"""cffi build script for vhostmd_py._runner (wired by setup.py's cffi_modules)."""

from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(_HERE, "runner.h")) as _f:
    _CDEF = _f.read()

ffibuilder = FFI()
ffibuilder.cdef(_CDEF)
ffibuilder.set_source(
    "vhostmd_py._runner",
    '#include <stdint.h>\n#include <stddef.h>\n#include "runner.h"',
    sources=[os.path.relpath(os.path.join(_HERE, "runner.c"))],
    include_dirs=[os.path.relpath(_HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c99", "-D_GNU_SOURCE"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
