"""The host package's shape: no class over 300 lines, at most 12 modules at its top.

What counts:
- a class's length is ``end_lineno - lineno + 1`` of its ``class`` statement
  as ast reports it (its docstring, comments and blank lines inside it
  included, decorators not), for every class in every ``*.py`` file under
  vhostmd_py/, nested classes too;
- the modules at the top are the ``*.py`` files directly in vhostmd_py/,
  ``__init__.py`` included; sub-packages (folders) and compiled extension
  files do not count.
Both checks print every offender, so one run names all there is to split.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import List

from helpers import REPO

PACKAGE = REPO / "vhostmd_py"
MAX_CLASS_LINES = 300
MAX_TOP_MODULES = 12


def long_classes(root: Path, limit: int) -> List[str]:
    """'path:line Name (N lines)' for each class under ROOT longer than LIMIT lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    where = path.relative_to(root.parent)
                    found.append(f"{where}:{node.lineno} {node.name} ({length} lines)")
    return found


def top_modules(root: Path) -> List[str]:
    """The *.py files directly in ROOT (__init__.py included), by name."""
    return sorted(p.name for p in root.glob("*.py") if p.is_file())


def test_no_class_over_300_lines() -> None:
    """Every class in vhostmd_py is at most 300 lines long."""
    offenders = long_classes(PACKAGE, MAX_CLASS_LINES)
    listing = "\n  ".join(offenders)
    assert offenders == [], f"classes over {MAX_CLASS_LINES} lines:\n  {listing}"


def test_at_most_12_modules_directly_under_vhostmd_py() -> None:
    """vhostmd_py/ holds at most 12 *.py files itself; the rest live in its folders."""
    modules = top_modules(PACKAGE)
    assert len(modules) <= MAX_TOP_MODULES, (
        f"{len(modules)} modules directly under vhostmd_py/ (at most {MAX_TOP_MODULES}): "
        + ", ".join(modules)
    )


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The measures above find a 301-line class (nested too) and count a 13th module."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    body = "\n".join(f"    x{i} = {i}" for i in range(299))
    (package / "sub" / "big.py").write_text(f"class Big:\n{body}\n    y = 0\n")  # 301 lines
    (package / "ok.py").write_text(f"class Fits:\n{body}\n")  # 300 lines
    nested = "\n".join(f"        z{i} = {i}" for i in range(300))
    (package / "nest.py").write_text(f"def f():\n    class Inner:\n{nested}\n    return Inner\n")
    assert long_classes(package, MAX_CLASS_LINES) == [
        "pkg/nest.py:2 Inner (301 lines)",
        "pkg/sub/big.py:1 Big (301 lines)",
    ]
    for i in range(10):
        (package / f"m{i}.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "data.txt").write_text("")
    # ok, nest, m0..m9, __init__: 13; sub/big.py and data.txt do not count.
    modules = top_modules(package)
    assert len(modules) == 13 > MAX_TOP_MODULES
    assert "__init__.py" in modules and "big.py" not in modules
