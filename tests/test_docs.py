"""The docs: a short front door, links that resolve, deviations once, DESIGN true to Config."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
from helpers import REPO

from vhostmd_py.config import Config

README = REPO / "README.md"
DOCS = REPO / "docs"
MANUALS = sorted(DOCS.glob("*.md"))
README_MAX_LINES = 200

# [text](target) outside code; targets with a scheme are not ours to check.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _links(path: Path) -> Iterator[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    for match in LINK.finditer(text):
        target = match.group(1)
        if not re.match(r"[a-z]+:", target):
            yield target


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> List[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return [_anchor(m.group(1)) for m in re.finditer(r"^#+ (.*)$", text, re.M)]


def _resolve(source: Path, target: str) -> Tuple[Path, str]:
    file_part, _, anchor = target.partition("#")
    path = (source.parent / file_part).resolve() if file_part else source
    return path, anchor


def test_readme_is_a_front_door() -> None:
    """The README stays at most 200 lines: what it is, two commands, install, links."""
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    text = "\n".join(lines)
    for command in ("scripts/run", "scripts/test", "scripts/install-host"):
        assert command in text


def test_readme_links_every_manual() -> None:
    """Every manual in docs/ (and the man pages) is reachable from the README."""
    targets = {_resolve(README, t)[0] for t in _links(README)}
    for manual in [*MANUALS, DOCS / "man"]:
        assert manual.resolve() in targets, f"README.md does not link {manual.name}"


@pytest.mark.parametrize(
    "source", [README, REPO / "guest" / "README.md", *MANUALS],
    ids=lambda p: p.relative_to(REPO).as_posix(),
)
def test_links_resolve(source: Path) -> None:
    """Every relative link names an existing file, and its #anchor a heading there."""
    for target in _links(source):
        path, anchor = _resolve(source, target)
        assert path.exists(), f"{source.name}: link {target} names no file"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{source.name}: {target}: no such heading"


def test_deviations_listed_once() -> None:
    """Where we differ from upstream is one section of COMPATIBILITY.md, not repeated elsewhere."""
    heading = re.compile(r"^#+ .*(deviation|where we differ)", re.I | re.M)
    found = [
        p.relative_to(REPO).as_posix()
        for p in [README, REPO / "guest" / "README.md", *MANUALS]
        for _ in heading.finditer(p.read_text(encoding="utf-8"))
    ]
    assert found == ["docs/COMPATIBILITY.md"]


def test_design_lists_every_config_field() -> None:
    """docs/DESIGN.md names every field of Config (a new field must be drawn there)."""
    design = (DOCS / "DESIGN.md").read_text(encoding="utf-8")
    block = design.split("class Config", 1)[1].split("```", 1)[0]
    missing = [f.name for f in dataclasses.fields(Config) if not re.search(rf"\b{f.name}\b", block)]
    assert missing == []


# Documents the repository does not hold must not be cited: the contract is
# docs/COMPATIBILITY.md, upstream's observations tests/data/golden/upstream/FACTS.md.
# (The words are assembled so that this file does not cite them itself.)
CITATION = re.compile("|".join((
    r"\b" + "SP" + r"EC\b",
    r"(?i:\b" + "iss" + r"ues? \d)",
    r"\b" + "FA" + r"CTS\b(?!\.md)",
)))
CITATION_DIRS = ("vhostmd_py", "guest", "csrc", "tests", "bench", "scripts", "conf")


def _tracked_text_files() -> Iterator[Path]:
    """The repository's own files (tracked, or new and not ignored): never a build's copies."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "--", *CITATION_DIRS],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    for rel in sorted(listed):
        path = REPO / rel
        if rel.startswith("tests/data/") or not path.is_file():
            continue
        if path.suffix in (".so", ".pyc", ".pyz", ".whl"):
            continue
        yield path


def test_comments_cite_only_what_the_repository_holds() -> None:
    """No code, comment or script cites an outside document (or its sections) or an issue."""
    found = []
    for path in _tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if CITATION.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == []
