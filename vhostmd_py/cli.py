"""`vhostmd`: the host daemon's command line, upstream's options plus a few.

Upstream's options and exit codes (FACTS.md section 5, golden daemon-cli/):
-h prints the usage on stderr and exits 2; an unknown option exits 1. Added:
--once, --dump, --jobs, --action-timeout, --version. This module only
parses: the process's life (start-up order, daemonizing, signals) is
vhostmd_py.process.life.run.

Parsed with getopt_long's rules and wording (vhostmd_wire.getopt_long), as
upstream parses it, rather than with click as vhostmdctl is: a script's
abbreviated `--conf` keeps working, and the daemon does not carry click's
import (about 1.5 MB of its resident memory and a tenth of its start-up,
bench/README.md "Footprint beside upstream") for the whole of its life.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Dict, List, NoReturn, Sequence, Tuple


def _import_asyncio_without_ssl() -> None:
    """Import asyncio with ssl unavailable to it, unless either is imported already.

    asyncio imports ssl at once only to offer TLS transports; the daemon
    serves none (the endpoint is plain HTTP on loopback, libvirt does its own
    TLS in C), and the ssl module and OpenSSL's start-up cost it ~1 MB of
    RSS (bench/bench_footprint.py). Only asyncio's view is affected: a later
    `import ssl` elsewhere gets the real module.
    """
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # makes `import ssl` fail
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]


_import_asyncio_without_ssl()  # before anything below imports asyncio

from vhostmd_wire import getopt_long  # noqa: E402

from vhostmd_py import __version__  # noqa: E402
from vhostmd_py.process.life import (  # noqa: E402
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    Options,
    run,
)

DEFAULT_CONFIG = "/etc/vhostmd/vhostmd.conf"
DEFAULT_PID_FILE = "/var/run/vhostmd.pid"

# getopt_long's tables: upstream's (vhostmd.c), then ours, which never change
# what an upstream command line means ("--ver" stays --verbose).
SHORT = "c:df:p:u:vh"
UPSTREAM_LONG = ("verbose", "no-daemonize", "config=", "pid-file=", "user=", "connect=", "help")
OUR_LONG = ("once", "dump", "jobs=", "action-timeout=", "version")
_SHORT_TO_LONG = {
    "-c": "--connect", "-d": "--no-daemonize", "-f": "--config", "-p": "--pid-file",
    "-u": "--user", "-v": "--verbose", "-h": "--help",
}

# Upstream's usage text byte for byte (golden daemon-cli/help.stderr), with our
# additions in the same style before the trailing description line.
USAGE = (
    "\n"
    "   Usage:\n"
    "   vhostmd [options]\n"
    "   \n"
    "   Options:\n"
    "   -h | --help            Display program help.\n"
    "   -v | --verbose         Verbose messages.\n"
    "   -c | --connect <uri>   Set the libvirt URI.\n"
    "   -d | --no-daemonize    Process will not daemonize - useful for debugging.\n"
    "   -f | --config <file>   Configuration file.\n"
    "   -p | --pid-file <file> PID file.\n"
    "   -u | --user <user>     Drop root privs and run as <user>.\n"
    "   --once                 Run one update, publish it and exit.\n"
    "   --dump                 Run one update, print the metrics on stdout, publish nothing.\n"
    "   --jobs <n>             Run at most <n> actions at a time (1 = one after another).\n"
    "   --action-timeout <s>   Kill an action still running after <s> seconds.\n"
    "   --version              Print the version and exit.\n"
    "   \n"
    "   Host metrics gathering daemon:\n"
    "   publishes host and VM metrics on a disk (vbd) and virtio-serial channels\n"
    "   for the guests to read; see vhostmd(8) and vhostmd.conf(5).\n"
    "   \n"
)



class UsageError(Exception):
    """A bad command line: the message (without the program name), then the usage, exit 1."""


def _jobs(raw: str) -> int:
    try:
        jobs = int(raw)
    except ValueError:
        raise UsageError(f"Invalid value for '--jobs': {raw!r} is not a valid integer.") from None
    if jobs < 1:
        raise UsageError(f"Invalid value for '--jobs': {jobs} is not in the range x>=1.")
    return jobs


def _timeout(raw: str) -> float:
    try:
        seconds = float(raw)
    except ValueError:
        raise UsageError(
            f"Invalid value for '--action-timeout': {raw!r} is not a valid float."
        ) from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(
            f"Invalid value for '--action-timeout': {raw} is not a finite number of seconds > 0."
        )
    return seconds


def parse_args(args: Sequence[str]) -> Tuple[Dict[str, str], int]:
    """(the options given by long name, the number of -v); UsageError for a bad command line."""
    try:
        pairs, rest = getopt_long.parse(args, SHORT, UPSTREAM_LONG, OUR_LONG)
    except getopt_long.OptionError as err:
        raise UsageError(str(err)) from None
    if rest:
        # Upstream ignores operands; a stray word is more likely a mistake.
        raise UsageError(
            f"Got unexpected extra argument{'s' if len(rest) > 1 else ''} ({' '.join(rest)})"
        )
    given: Dict[str, str] = {}
    verbose = 0
    for opt, value in pairs:
        name = _SHORT_TO_LONG.get(opt, opt)
        if name == "--verbose":
            verbose += 1
        given[name] = value
    return given, verbose


def options(args: Sequence[str]) -> Options:
    """The daemon's Options for a command line without --help or --version."""
    given, verbose = parse_args(args)
    once, dump = "--once" in given, "--dump" in given
    if once and dump:
        raise UsageError("--once and --dump cannot be used together")
    jobs = _jobs(given["--jobs"]) if "--jobs" in given else None
    action_timeout = _timeout(given["--action-timeout"]) if "--action-timeout" in given else None
    config = given.get("--config", DEFAULT_CONFIG)
    pid_file = given.get("--pid-file")
    daemonize = not ("--no-daemonize" in given or once or dump)
    if pid_file is None and not (once or dump) and os.geteuid() == 0:
        # Upstream uses its default pid file whenever it runs as root, with
        # -d too (FACTS.md section 5): so two daemons cannot run unnoticed.
        pid_file = DEFAULT_PID_FILE
    if daemonize:
        # The daemon chdirs to /: a relative -f (re-read on SIGHUP) must
        # still name the file the user meant.
        config = os.path.abspath(config)
    # Absolute also with -d: the pid-file remover (-u) may not share our cwd.
    pid_file = os.path.abspath(pid_file) if pid_file is not None else None
    return Options(
        verbose=verbose,
        daemonize=daemonize,
        config=config,
        pid_file=pid_file,
        user=given.get("--user"),
        uri=given.get("--connect"),
        once=once,
        dump=dump,
        jobs=jobs,
        action_timeout=action_timeout,
    )


def _help_before_bad_option(args: Sequence[str]) -> bool:
    """Whether -h/--help comes before the option getopt_long refuses.

    Upstream acts on each option as getopt_long returns it: a -h before a bad
    option prints the usage (exit 2), one after it is never reached (exit 1).
    """
    for end in range(len(args)):
        try:
            given, _ = parse_args(args[: end + 1])
        except UsageError:
            return False
        if "--help" in given:
            return True
    return False


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of `vhostmd`: parse, run, exit with upstream's codes."""
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    try:
        given, _ = parse_args(args)
        if "--help" in given:  # wins over every other option, as upstream's -h
            sys.stderr.write(USAGE)
            sys.exit(EXIT_USAGE)
        if "--version" in given:
            # Not upstream's (it has no --version): on stdout, exit 0, as GNU tools do.
            sys.stdout.write(f"{PROG} (vhostmd-py) {__version__}\n")
            sys.exit(EXIT_OK)
        opts = options(args)
    except UsageError as err:
        if _help_before_bad_option(args):
            sys.stderr.write(USAGE)
            sys.exit(EXIT_USAGE)
        # Upstream exits 1 (not getopt's usual 2) on a bad option.
        sys.stderr.write(f"{PROG}: {err}\n" + USAGE)
        sys.exit(EXIT_FAILURE)
    sys.exit(run(opts))


if __name__ == "__main__":  # pragma: no cover - `python -m vhostmd_py.cli`
    main()
