"""Import boundaries, checked in fresh interpreters (nothing imported by other tests leaks in).

Host side: rendering and substitution load no compiled module (only the runner
binding loads vhostmd_py.sources.shell._runner, only mdisk loads vhostmd_py.publish._mdisk), and the
host package imports nothing from the guest package.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from typing import List

import pytest
from helpers import REPO

COMPILED = ("vhostmd_py.sources.shell._runner", "vhostmd_py.publish._mdisk")


def _modules_after(*imports: str) -> List[str]:
    """sys.modules of a fresh interpreter after importing IMPORTS."""
    code = "".join(f"import {name}\n" for name in imports)
    code += "import json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert proc.returncode == 0, proc.stderr
    loaded: List[str] = json.loads(proc.stdout)
    return loaded


@pytest.mark.parametrize(
    "module",
    [
        "vhostmd_py.sources.shell.substitution",
        "vhostmd_py.cycle.render",
        "vhostmd_py.sources.base",
        "vhostmd_py.cycle.collect",
        "vhostmd_py.config",
        "vhostmd_py.publish.virtio.protocol",
        "vhostmd_py.cli",
    ],
)
def test_rendering_and_substitution_load_no_compiled_module(module: str) -> None:
    """Importing these modules loads neither _runner nor _mdisk."""
    loaded = _modules_after(module)
    assert module in loaded
    assert [name for name in COMPILED if name in loaded] == []


def test_the_runner_binding_is_what_loads_runner() -> None:
    """The check above can fail: importing the binding does load _runner (and only it)."""
    loaded = _modules_after("vhostmd_py.sources.shell.runner")
    assert "vhostmd_py.sources.shell._runner" in loaded
    assert "vhostmd_py.publish._mdisk" not in loaded


def _host_modules() -> List[str]:
    package = REPO / "vhostmd_py"
    names = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_host_imports_nothing_from_the_guest_package() -> None:
    """No vhostmd_py module names vhostmd_guest in an import, and importing them all
    leaves vhostmd_guest out of sys.modules."""
    for path in sorted((REPO / "vhostmd_py").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "vhostmd_guest" for n in names), (path, names)
    pytest.importorskip("libvirt")  # libvirt_vms imports it
    loaded = _modules_after(*_host_modules())
    assert not any(name.split(".")[0] == "vhostmd_guest" for name in loaded)


# --- guest side: the guest and the wire format import nothing of the host -------------


def _package_modules(package: str) -> List[str]:
    folder = REPO / "guest" / package
    return [package] + [
        f"{package}.{p.stem}"
        for p in sorted(folder.glob("*.py"))
        if p.stem not in ("__init__", "__main__")
    ]


def _modules_with_blocked(imports: List[str], blocked: List[str]) -> List[str]:
    """Like _modules_after, with the BLOCKED packages made unimportable first."""
    code = "import sys\n" + "".join(f"sys.modules[{b!r}] = None\n" for b in blocked)
    code += "".join(f"import {name}\n" for name in imports)
    code += "import json\nprint(json.dumps([n for n, m in sys.modules.items() if m is not None]))\n"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert proc.returncode == 0, proc.stderr
    loaded: List[str] = json.loads(proc.stdout)
    return loaded


GUEST_AND_WIRE = _package_modules("vhostmd_guest") + _package_modules("vhostmd_wire")


def test_guest_and_wire_import_nothing_of_the_host() -> None:
    """Every guest and wire module imports with vhostmd_py, lxml, click and cffi blocked."""
    blocked = ["vhostmd_py", "lxml", "click", "cffi", "_cffi_backend", "libvirt"]
    loaded = _modules_with_blocked(GUEST_AND_WIRE, blocked)
    assert set(GUEST_AND_WIRE) <= set(loaded)
    assert [m for m in loaded if m.split(".")[0] in blocked] == []


def test_wire_imports_nothing_of_the_guest() -> None:
    """The wire format stands alone: importing it loads no vhostmd_guest module."""
    loaded = _modules_with_blocked(_package_modules("vhostmd_wire"), ["vhostmd_guest"])
    assert [m for m in loaded if m.split(".")[0] in ("vhostmd_guest", "vhostmd_py")] == []


def test_each_compiled_module_has_one_binding() -> None:
    """Only the binding modules import the compiled modules (at module level or in a function):
    sources/shell/binding.py for _runner, publish/mdisk.py for _mdisk."""
    owners = {
        "vhostmd_py.sources.shell._runner": "vhostmd_py/sources/shell/binding.py",
        "vhostmd_py.publish._mdisk": "vhostmd_py/publish/mdisk.py",
    }
    found: dict[str, List[str]] = {name: [] for name in owners}
    for path in sorted((REPO / "vhostmd_py").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                if name in found:
                    found[name].append(str(path.relative_to(REPO)))
    assert found == {name: [owner] for name, owner in owners.items()}
