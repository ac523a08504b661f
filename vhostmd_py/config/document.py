"""The XML of a vhostmd.conf (and of the files its sections name), read safely, once.

A file is parsed with a safe lxml parser (no network, no DTD loading, no
entity expansion) and ALWAYS validated against our own ``vhostmd.dtd``
(package data): upstream resolves the DOCTYPE's system id next to the
config and refuses a file without DOCTYPE ("Validation failed: no DTD
found !", daemon-cli/no-doctype.stderr). DEVIATION: a config without a
DOCTYPE, or whose DOCTYPE names another location, is validated against our
grammar and accepted when valid.

Every error is a ConfigError naming the file and, when there is one, the line.
"""

from __future__ import annotations

import os
from typing import Any, List, Tuple

from lxml import etree

from vhostmd_py.errors import ConfigError, StrPath
from vhostmd_py.safexml import safe_parser


def line_of(elem: etree._Element) -> int | None:
    """ELEM's line in its file, when libxml knows it."""
    line = elem.sourceline
    return line if isinstance(line, int) else None


def text_of(elem: etree._Element) -> str:
    """ELEM's text, stripped."""
    # String value of the element (comments excluded), like libxml's
    # xmlNodeGetContent that upstream uses.
    return str(elem.xpath("string()")).strip()


def child(parent: etree._Element, tag: str) -> etree._Element:
    """PARENT's first <TAG>, which the DTD guarantees."""
    elem = parent.find(tag)
    assert elem is not None, tag  # guaranteed by the DTD
    return elem


def yes(elem: etree._Element, attr: str, default: bool) -> bool:
    """A yes/no attribute (the DTD allows only those two), DEFAULT when absent."""
    raw = elem.get(attr)
    return default if raw is None else raw == "yes"


def default_dtd_path() -> str:
    """The shipped vhostmd.dtd (package data)."""
    # Beside the package, as cycle.render's metric.dtd (why not importlib.resources
    # or pathlib: there).
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                        "vhostmd.dtd")


def load_dtd(file: str, dtd: StrPath | None) -> etree.DTD:
    """The grammar (DTD, default: the shipped one) FILE is validated against."""
    dtd_file = os.fspath(dtd) if dtd is not None else default_dtd_path()
    try:
        with open(dtd_file, "rb") as fh:
            return etree.DTD(fh)
    except (OSError, etree.DTDParseError) as err:
        raise ConfigError(file, f"cannot load the configuration grammar {dtd_file}: {err}") from err


def parse_root(data: bytes, file: str, tag: str, *, also: Tuple[str, ...] = ()) -> etree._Element:
    """DATA's root element, which must be <TAG> (or one of ALSO); syntax errors and
    entities refused."""
    try:
        root = etree.fromstring(data, safe_parser())
    except etree.XMLSyntaxError as err:
        line = err.lineno if err.lineno else None
        reason = f"XML syntax error: {err.msg}"
        hint = _ampersand_hint(data, line, str(err.msg))
        raise ConfigError(file, f"{reason}{hint}", line) from err
    for node in root.iter(etree.Entity):
        # resolve_entities=False leaves them as nodes; their text would be
        # silently missing from an action, so refuse instead.
        raise ConfigError(file, f"entity reference {node.text} is not supported", line_of(node))
    if root.tag != tag and root.tag not in also:
        raise ConfigError(file, f"root element is <{root.tag}>, expected <{tag}>", line_of(root))
    return root


def validate(root: etree._Element, file: str, grammar: etree.DTD) -> None:
    """ROOT valid against GRAMMAR, else ConfigError with libxml's first useful complaint."""
    if not grammar.validate(root):
        raise dtd_error(file, [*grammar.error_log])  # type: ignore[misc]


def included(elem: etree._Element, file: str, grammar: etree.DTD, *,
             foreign: Tuple[str, ...] = ()) -> Tuple[etree._Element, str]:
    """The element itself, or the root of the file its ``file`` attribute names, and its file.

    The named file is relative to FILE's directory, its root is the same
    element, and it is validated against the same grammar; or its root is
    one of FOREIGN (another format, e.g. perfmon's <config>), returned as it
    is for the caller to read.
    """
    ref = elem.get("file")
    if ref is None:
        return elem, file
    if len(elem):
        raise ConfigError(file, f"<{elem.tag} file=...> must be empty", line_of(elem))
    path = os.path.join(os.path.dirname(os.path.abspath(file)), str(ref))
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise ConfigError(
            file, f"cannot read {elem.tag} file {path}: {err.strerror or err}", line_of(elem)
        ) from err
    root = parse_root(data, path, str(elem.tag), also=foreign)
    if root.tag in foreign:
        return root, path
    if root.get("file") is not None:
        raise ConfigError(
            path, f"an included <{elem.tag}> cannot name another file", line_of(root)
        )
    # The same wording and ordering (unknown element first) as the main file.
    validate(root, path, grammar)
    return root, path


def _ampersand_hint(data: bytes, line: int | None, message: str) -> str:
    """A hint for the commonest syntax error in actions: a raw `&` (`a && b`, `cmd &`).

    libxml only says "xmlParseEntityRef: no name" (or "EntityRef: expecting
    ';'"), which names nothing an operator wrote; the shell's `&&` must be
    written `&amp;&amp;` in XML.
    """
    if line is None or "EntityRef" not in message:
        return ""
    lines = data.splitlines()
    if not 1 <= line <= len(lines) or b"&" not in lines[line - 1]:
        return ""
    return (
        " (a raw '&' in the text: in XML write '&&' as '&amp;&amp;' and '&' as '&amp;', "
        "or put the action in <![CDATA[ ... ]]>)"
    )


def dtd_error(file: str, entries: List[Any]) -> ConfigError:
    """The ConfigError for FILE's DTD validation errors ENTRIES (libxml's error log)."""
    # libxml reports a parent's "content does not follow the DTD" before the
    # unknown child that caused it; upstream (validating while parsing) names
    # the child first (daemon-cli/dtd-invalid.stderr: "No declaration for
    # element bogus" at line 13), which is the useful one: put it first.
    entries = sorted(entries, key=lambda e: not str(e.message).startswith("No declaration"))
    if not entries:
        return ConfigError(file, "fails DTD validation")
    first = entries[0]
    reason = f"fails DTD validation: {first.message}"
    others = [f"line {e.line}: {e.message}" for e in entries[1:4]]
    if others:
        reason += " (also " + "; ".join(others) + ")"
    return ConfigError(file, reason, first.line or None)


def vm_selector(elem: etree._Element, file: str) -> Tuple[str | None, str | None]:
    """A ``<vm uuid= name=>``'s (uuid, name); at least one is given."""
    uuid, name = elem.get("uuid"), elem.get("name")
    if not uuid and not name:
        raise ConfigError(file, "<vm> needs a name or a uuid attribute", line_of(elem))
    return (str(uuid) if uuid else None, str(name) if name else None)
