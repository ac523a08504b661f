"""Upstream's command lines: glibc getopt_long's parsing and wording, for both sides.

Upstream's vhostmd and vm-dump-metrics parse their options with
getopt_long, and scripts around them may depend on what it accepts (long
options abbreviated to any unique prefix, options after operands) and on how
it words a bad option (golden daemon-cli/unknown-option, reader/cases/badopt).
Python's getopt.gnu_getopt parses the same way but words its errors its own
way; :func:`parse` gives glibc's lines.

Our commands add long options upstream does not have (--version, --once,
...). An addition must not change what an upstream command line means:
``vhostmd --ver`` is upstream's --verbose, not ambiguous with our --version.
So a long option that abbreviates exactly one of upstream's names is taken as
that name before our additions are considered.
"""

import getopt
from typing import List, Sequence, Tuple


class OptionError(Exception):
    """A bad command line; str() is getopt_long's message, without the program name."""


def _name(spec: str) -> str:
    return spec.rstrip("=")


def _message(err: getopt.GetoptError, long_options: Sequence[str]) -> str:
    opt, msg = err.opt, err.msg
    if not msg.startswith("option --"):  # a short option
        if msg.endswith("requires argument"):
            return f"option requires an argument -- '{opt}'"
        return f"invalid option -- '{opt}'"
    if msg.endswith("requires argument"):
        return f"option '--{opt}' requires an argument"
    if msg.endswith("must not have an argument"):
        return f"option '--{opt}' doesn't allow an argument"
    if msg.endswith("not a unique prefix"):
        names = " ".join(f"'--{_name(n)}'" for n in long_options if n.startswith(opt))
        return f"option '--{opt}' is ambiguous; possibilities: {names}"
    return f"unrecognized option '--{opt}'"


def _takes_value(arg: str, short: str, long_options: Sequence[str]) -> bool:
    """Whether ARG (an option) consumes the next argument as its value."""
    if arg.startswith("--"):
        if "=" in arg:
            return False
        name = arg[2:]
        exact = [n for n in long_options if _name(n) == name]
        found = exact or [n for n in long_options if n.startswith(name)]
        return len(found) == 1 and found[0].endswith("=")
    # A cluster such as -vdf: the first option taking a value ends it.
    for i, letter in enumerate(arg[1:]):
        where = short.find(letter)
        if where >= 0 and short[where + 1 : where + 2] == ":":
            return i == len(arg) - 2  # the value is the next argument only at the end
    return False


def _prefer_upstream(args: Sequence[str], short: str, upstream: Sequence[str],
                     every: Sequence[str]) -> List[str]:
    """ARGS with each abbreviation of exactly one upstream long option spelled out."""
    out: List[str] = []
    value_next = False
    for i, arg in enumerate(args):
        if value_next:
            out.append(arg)
            value_next = False
            continue
        if arg == "--":
            out.extend(args[i:])
            break
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if not any(_name(n) == name for n in every):
                matches = [n for n in upstream if n.startswith(name)]
                if len(matches) == 1:
                    arg = "--" + _name(matches[0]) + eq + value
        if arg.startswith("-") and arg != "-":
            value_next = _takes_value(arg, short, every)
        out.append(arg)
    return out


def parse(args: Sequence[str], short: str, upstream: Sequence[str],
          additions: Sequence[str] = ()) -> Tuple[List[Tuple[str, str]], List[str]]:
    """(options, operands) as gnu_getopt gives them; OptionError worded as glibc's.

    SHORT and UPSTREAM are getopt_long's tables (a trailing "=" marks a long
    option taking a value); ADDITIONS are our long options, known only where
    they do not change the meaning of an upstream command line.
    """
    every = list(upstream) + list(additions)
    try:
        return getopt.gnu_getopt(_prefer_upstream(args, short, upstream, every), short, every)
    except getopt.GetoptError as err:
        raise OptionError(_message(err, every)) from None
