"""Token substitution in metric actions: the shell lexer that decides where a value may go.

docs/COMPATIBILITY.md, Actions. Upstream replaces every plain-text occurrence
of ``CONNECT`` (always) and ``NAME``, ``VMID``, ``UUID`` (vm context only) one
token after the other over the whole string, so a VM named ``UUID`` gets its
name replaced again, and a VM named ``$(touch x)`` runs ``touch x`` (upstream
bugs). Here all tokens, plus a whole-word ``ID`` (the seed documentation's
name for the id), are replaced in ONE pass that never re-scans inserted text.
A value made only of characters the shell treats literally is inserted
verbatim, so commands for normal names, ids, UUIDs and URIs are byte-identical
to upstream's. Any other value is accepted in one position only: unquoted, as
shlex-quoted words of a command the action runs itself. Everywhere else the
metric is refused for that VM with a logged reason: inside '...' or "..."
(quoted text is often code for another program: ``sh -c '... NAME'``,
``awk '/NAME/'``, ``ssh host "... NAME"``, and quoting for the outer shell
does not protect the inner one), in an action that hands its words to another
interpreter (eval, sh -c, ssh, su, sudo, xargs, trap), and wherever the small
lexer of the action text cannot be sure of the context (command substitution,
backticks, here-documents, comments, after a backslash, unbalanced quotes).

Pure Python: importing this module loads no compiled module (the runner
binding is vhostmd_py.sources.shell.runner, imported only by code that runs actions).
"""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass
from typing import Dict, List, Tuple

from vhostmd_py.errors import ActionError
from vhostmd_py.sources.vm import VM

# Characters the shell never treats specially (no quoting, expansion, globbing,
# word splitting); covers libvirt names in practice, ids, UUIDs and usual URIs.
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.:@%+=,/-]+\Z")
# `ID` is our addition (the seed documentation's name for the id): a shell
# variable `$ID` / `${ID}` is the user's, never ours.
_VM_TOKENS = re.compile(r"CONNECT|VMID|UUID|NAME|(?<![$\w{])ID\b")
# Upstream replaces only CONNECT in host context (edge-4k HostNameToken keeps
# `NAME VMID UUID` literally).
_HOST_TOKENS = re.compile(r"CONNECT")

UNQUOTED = "unquoted"
SINGLE = "single-quoted"
DOUBLE = "double-quoted"
UNSURE = "unsure"


@dataclass(frozen=True)
class _Template:
    """An action split at its tokens; literals has one more item than tokens."""

    literals: Tuple[str, ...]
    tokens: Tuple[Tuple[str, str, str], ...]  # (token, context, why-unsure)
    # The command word that re-reads its arguments as code, if the action has one.
    reinterpreter: str = ""


# Commands that parse their arguments as shell (or remote shell) code again:
# a value quoted once for our sh would be unquoted by it and run by them.
_REINTERPRETER = re.compile(
    r"(?<![\w./-])(?:eval|trap|xargs|ssh|su|sudo|runuser|doas)(?![\w./-])"
    r"|(?<![\w.-])(?:[\w./-]*/)?(?:sh|bash|dash|ksh|mksh|zsh|ash|busybox)"
    r"(?![\w.-])[^|;&\n]*?\s-[A-Za-z]*c(?![\w-])"
)


def _lex(text: str) -> List[Tuple[str, str]]:
    """Quoting context before each character: (context, reason when UNSURE)."""
    n = len(text)
    out: List[Tuple[str, str]] = [(UNSURE, "")] * n
    # Frames: "U" top level, "P" ( ) subshell (transparent), "S" '...',
    # "D" "...", "C" $( ), "B" ${ }, "Q" backticks, "#" comment.
    stack: List[str] = ["U"]
    escaped: Dict[int, str] = {}
    i = 0
    while i < n:
        frames = [f for f in stack if f != "P"]
        if i in escaped:
            out[i] = (UNSURE, escaped[i])
        elif frames == ["U"]:
            out[i] = (UNQUOTED, "")
        elif frames == ["U", "S"]:
            out[i] = (SINGLE, "")
        elif frames == ["U", "D"]:
            out[i] = (DOUBLE, "")
        else:
            outer = [f for f in frames if f in "CBQ#"]
            out[i] = (UNSURE, _WHY[outer[0] if outer else frames[-1]])
        c = text[i]
        top = stack[-1]
        if top == "S":
            if c == "'":
                stack.pop()
            i += 1
            continue
        if top == "#":
            if c == "\n":
                stack.pop()
            i += 1
            continue
        if c == "\\":
            if i + 1 < n:
                out[i + 1] = (UNSURE, "it follows a backslash")
            i += 2
            continue
        if c == "$" and i + 1 < n:
            # `$NAME` is a variable name in upstream: quoting cannot make it mean anything.
            escaped[i + 1] = "it follows a $"
            nxt = text[i + 1]
            if nxt == "(":
                stack.append("C")
                i += 2
                continue
            if nxt == "{":
                stack.append("B")
                i += 2
                continue
        if c == "`":
            if top == "Q":
                stack.pop()
            else:
                stack.append("Q")
        elif top == "D":
            if c == '"':
                stack.pop()
        elif c == "'":
            stack.append("S")
        elif c == '"':
            stack.append("D")
        elif c == "(":
            stack.append("P")
        elif c == ")":
            if top in ("P", "C"):
                stack.pop()
            else:
                # Unbalanced (or a `case` pattern): stop trusting anything after.
                return _rest_unsure(out, i + 1, "the parentheses are unbalanced")
        elif c == "}" and top == "B":
            stack.pop()
        elif c == "#" and (i == 0 or text[i - 1] in " \t\n;&|()"):
            stack.append("#")
        elif c == "<" and text.startswith("<<", i):
            return _rest_unsure(out, i + 1, "it is in a here-document")
        i += 1
    if stack[-1] == "#":
        stack.pop()
    if [f for f in stack if f != "P"] != ["U"]:
        return _rest_unsure(out, 0, "the quotes or parentheses are unbalanced")
    return out


_WHY = {
    "C": "it is inside $(...)",
    "B": "it is inside ${...}",
    "Q": "it is inside backticks",
    "#": "it is in a comment",
    "S": "it is in nested quotes",
    "D": "it is in nested quotes",
    "U": "it is nested",
}


def _rest_unsure(out: List[Tuple[str, str]], start: int, why: str) -> List[Tuple[str, str]]:
    for j in range(start, len(out)):
        out[j] = (UNSURE, why)
    return out


@functools.lru_cache(maxsize=4096)
def _template(action: str, vm_context: bool) -> _Template:
    pattern = _VM_TOKENS if vm_context else _HOST_TOKENS
    matches = list(pattern.finditer(action))
    if not matches:
        return _Template((action,), ())
    contexts = _lex(action)
    literals: List[str] = []
    tokens: List[Tuple[str, str, str]] = []
    pos = 0
    for m in matches:
        literals.append(action[pos : m.start()])
        ctx, why = contexts[m.start()]
        tokens.append((m.group(), ctx, why))
        pos = m.end()
    literals.append(action[pos:])
    found = _REINTERPRETER.search(action)
    return _Template(tuple(literals), tuple(tokens), found.group() if found else "")


def substitute(action: str, vm: VM | None, uri: str | None, *, metric: str = "") -> str:
    """The command for VM (None = host context); ActionError when it cannot be made safe."""
    tpl = _template(action, vm is not None)
    if not tpl.tokens:
        return action
    parts = [tpl.literals[0]]
    for (token, ctx, why), literal in zip(tpl.tokens, tpl.literals[1:]):
        parts.append(_token_value(token, ctx, why, tpl.reinterpreter, vm, uri, metric))
        parts.append(literal)
    return "".join(parts)


def _token_value(
    token: str,
    ctx: str,
    why: str,
    reinterpreter: str,
    vm: VM | None,
    uri: str | None,
    metric: str,
) -> str:
    vm_name = vm.name if vm is not None else None
    if token == "CONNECT":
        if not uri:
            return ""
        if _SAFE_VALUE.match(uri):
            return f"--connect '{uri}'"  # upstream's exact text
        raw, what = uri, "the libvirt URI"
    else:
        assert vm is not None
        if token == "NAME":
            raw, what = vm.name, "the VM name"
        elif token == "UUID":
            raw, what = vm.uuid, "the VM UUID"
        else:  # VMID, ID
            raw, what = str(vm.id), "the VM id"
        if _SAFE_VALUE.match(raw):
            return raw
    if "\x00" in raw:
        raise ActionError(metric, f"{what} contains a NUL character", vm_name)
    if ctx == UNSURE:
        problem = why
    elif ctx != UNQUOTED:
        problem = f"it is {ctx} (quoted text may be code for another program)"
    elif reinterpreter:
        command = reinterpreter.split()[0]
        problem = f"the action passes its words to {command!r}, which re-reads them as code"
    else:
        quoted = shlex.quote(raw)
        return "--connect " + quoted if token == "CONNECT" else quoted
    raise ActionError(
        metric,
        f"refusing to substitute {token} with {what} {raw!r}: it needs quoting and {problem}",
        vm_name,
    )
