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
from pathlib import Path
from typing import List

import pytest
from helpers import REPO

COMPILED = (
    "vhostmd_py.sources.shell._runner", "vhostmd_py.publish._mdisk", "vhostmd_py.process._process"
)


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
    sources/shell/binding.py for _runner, publish/mdisk.py for _mdisk, process/memory.py for
    _process."""
    owners = {
        "vhostmd_py.sources.shell._runner": "vhostmd_py/sources/shell/binding.py",
        "vhostmd_py.publish._mdisk": "vhostmd_py/publish/mdisk.py",
        "vhostmd_py.process._process": "vhostmd_py/process/memory.py",
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


# --- the host package's import graph, from its source ------------------------------------
#
# Every import counts: module level, inside functions, and under ``if TYPE_CHECKING:``.
# An import inside a function only moves a dependency from import time to call time, and
# a TYPE_CHECKING import is still a dependency of the module's interface (its annotations
# name the other module's types, and mypy reads them); hiding either kind is how circles
# and arrows back up the layers had gone unnoticed.


def _module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((REPO / "vhostmd_py").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> List[str]:
    """The vhostmd_py modules one import statement NODE of MODULE names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "vhostmd_py"]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    if base.split(".")[0] != "vhostmd_py":
        return []
    # `from P import n` imports module P.n when there is one, else takes n from P.
    names = [f"{base}.{alias.name}" for alias in node.names]
    submodules = [name for name in names if name in known]
    return submodules if len(submodules) == len(names) else [base, *submodules]


def import_graph() -> dict[str, set[str]]:
    """Module -> the host modules it imports, from every import statement in its source.

    A name that is no .py module of the package (a compiled extension) is a leaf.
    """
    files = _module_files()
    known = set(files)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        targets = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets.update(t for t in _imported(node, module, is_package, known) if t != module)
    return graph


def test_config_imports_nothing_above_it() -> None:
    """The config package reads the file and builds records: it imports the errors and the
    safe XML parser, never a source, the cycle or a publisher (the built-in sources' field
    table is handed to its parser)."""
    graph = import_graph()
    config = {m: deps for m, deps in graph.items() if m.split(".")[:2] == ["vhostmd_py", "config"]}
    assert len(config) > 5
    outside = {d for deps in config.values() for d in deps if not d.startswith("vhostmd_py.config")}
    assert outside == {"vhostmd_py.errors", "vhostmd_py.safexml"}
def find_cycles(graph: dict[str, set[str]]) -> List[List[str]]:
    """One cycle (first module repeated at the end) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: List[str] = []
    on_stack: set[str] = set()
    components: List[List[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, set(component), component[0]) for component in components]


def _cycle_in(graph: dict[str, set[str]], members: set[str], start: str) -> List[str]:
    """A shortest path from START back to itself inside one component (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & members):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if succ not in parents:
                    parents[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"{start} is in no cycle")  # a component always has one


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function() -> None:
    """The check below can fail: a circle closed only by an import inside a function."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    # Function-level and TYPE_CHECKING imports are edges of the graph as well.
    module = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from vhostmd_py.errors import ConfigError\n"
        "def f():\n    from vhostmd_py import cli\n    import vhostmd_py.fs\n"
    )
    known = {"vhostmd_py", "vhostmd_py.errors", "vhostmd_py.cli", "vhostmd_py.fs"}
    found = {t for node in ast.walk(module) for t in _imported(node, "vhostmd_py.x", False, known)}
    assert found == {"vhostmd_py.errors", "vhostmd_py.cli", "vhostmd_py.fs"}


def test_no_import_circle_in_the_host_package() -> None:
    """No chain of imports (anywhere in a module) leads from a host module back to itself."""
    graph = import_graph()
    assert "vhostmd_py.config" in graph and graph["vhostmd_py.cli"]  # the graph was read
    cycles = find_cycles(graph)
    assert cycles == [], "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)
