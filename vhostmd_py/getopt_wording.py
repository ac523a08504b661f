"""getopt_long's wording for option errors, for our click front ends.

Upstream's vhostmd and vm-dump-metrics parse options with getopt_long, and
scripts around them may match its messages (golden daemon-cli/unknown-option
and reader/cases/badopt); click words these errors its own way.
"""

from __future__ import annotations

import click


def getopt_message(prog: str, err: click.ClickException) -> str:
    """The line getopt_long would print for this option error."""
    if isinstance(err, click.NoSuchOption):
        name = err.option_name
        if name.startswith("--"):
            return f"{prog}: unrecognized option '{name}'"
        return f"{prog}: invalid option -- '{name.lstrip('-')[:1]}'"
    if isinstance(err, click.BadOptionUsage) and "requires an argument" in err.message:
        name = err.option_name
        if name.startswith("--"):
            return f"{prog}: option '{name}' requires an argument"
        return f"{prog}: option requires an argument -- '{name.lstrip('-')[:1]}'"
    return f"{prog}: {err.format_message()}"
