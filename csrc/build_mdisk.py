"""cffi build script for vhostmd_py._mdisk (wired by setup.py's cffi_modules)."""

from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(_HERE, "mdisk.h")) as _f:
    _CDEF = _f.read()

ffibuilder = FFI()
ffibuilder.cdef(_CDEF)
ffibuilder.set_source(
    "vhostmd_py._mdisk",
    '#include <stdint.h>\n#include <stddef.h>\n#include "mdisk.h"',
    sources=[os.path.relpath(os.path.join(_HERE, "mdisk.c"))],
    include_dirs=[os.path.relpath(_HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c99", "-D_GNU_SOURCE"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
