"""cffi build scripts of the three C modules (wired by setup.py's cffi_modules).

Each module is a real .c file compiled as it is, plus its declarations-only
header, read both as the cffi cdef and by the C compiler:
- vhostmd_py.publish._mdisk: the metrics disk (checksum, header, publish);
  the host publishes through it. Guests do not need it: they read with the
  pure Python of vhostmd_wire.disk.
- vhostmd_py.sources.shell._runner: the daemon's action batch runner.
- vhostmd_py.process._process: process-wide settings (the C allocator's arenas).

Test-only C (csrc/tests/: the C stable read, a runner harness) is not built
here: the tests build it (tests/helpers/cread.py, tests/host/sources).
"""

from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))


def _builder(module: str, stem: str) -> FFI:
    with open(os.path.join(_HERE, f"{stem}.h")) as f:
        cdef = f.read()
    ffi = FFI()
    ffi.cdef(cdef)
    ffi.set_source(
        module,
        f'#include <stdint.h>\n#include <stddef.h>\n#include "{stem}.h"',
        sources=[os.path.relpath(os.path.join(_HERE, f"{stem}.c"))],
        include_dirs=[os.path.relpath(_HERE)],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c99", "-D_GNU_SOURCE"],
    )
    return ffi


mdisk_ffi = _builder("vhostmd_py.publish._mdisk", "mdisk")
runner_ffi = _builder("vhostmd_py.sources.shell._runner", "runner")
process_ffi = _builder("vhostmd_py.process._process", "process")

if __name__ == "__main__":
    mdisk_ffi.compile(verbose=True)
    runner_ffi.compile(verbose=True)
    process_ffi.compile(verbose=True)
