"""`vhostmd`: the host daemon's command line, upstream's options plus a few.

Upstream's options and exit codes (FACTS.md section 5, golden daemon-cli/):
-h prints the usage on stderr and exits 2; an unknown option exits 1. Added:
--once, --dump, --jobs, --action-timeout. This module only parses: the
process's life (start-up order, daemonizing, signals) is vhostmd_py.process.life.run.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn, Sequence


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

import click  # noqa: E402

from vhostmd_py import __version__  # noqa: E402
from vhostmd_py.getopt_wording import getopt_message  # noqa: E402
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


class _UsageExit(Exception):
    """-h/--help: the usage on stderr, exit 2 (upstream)."""


def _help(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        raise _UsageExit()


def _version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    # Not upstream's (it has no --version): on stdout, exit 0, as GNU tools do.
    if value and not ctx.resilient_parsing:
        click.echo(f"{PROG} (vhostmd-py) {__version__}")
        ctx.exit(EXIT_OK)


@click.command(context_settings={"help_option_names": []}, add_help_option=False)
@click.option(
    "-h", "--help", "show_help", is_flag=True, expose_value=False, is_eager=True, callback=_help
)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version)
@click.option("-v", "--verbose", count=True)
@click.option("-d", "--no-daemonize", "no_daemonize", is_flag=True)
@click.option("-f", "--config", "config", default=DEFAULT_CONFIG, metavar="FILE")
@click.option("-p", "--pid-file", "pid_file", default=None, metavar="FILE")
@click.option("-u", "--user", "user", default=None, metavar="USER")
@click.option("-c", "--connect", "uri", default=None, metavar="URI")
@click.option("--once", is_flag=True)
@click.option("--dump", is_flag=True)
@click.option("--jobs", type=click.IntRange(min=1), default=None)
@click.option(
    "--action-timeout", "action_timeout", type=click.FloatRange(min=0, min_open=True), default=None
)
def command(
    verbose: int,
    no_daemonize: bool,
    config: str,
    pid_file: str | None,
    user: str | None,
    uri: str | None,
    once: bool,
    dump: bool,
    jobs: int | None,
    action_timeout: float | None,
) -> int:
    """The vhostmd daemon."""
    if once and dump:
        raise click.UsageError("--once and --dump cannot be used together")
    daemonize = not (no_daemonize or once or dump)
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
    opts = Options(
        verbose=verbose,
        daemonize=daemonize,
        config=config,
        pid_file=pid_file,
        user=user,
        uri=uri,
        once=once,
        dump=dump,
        jobs=jobs,
        action_timeout=action_timeout,
    )
    return run(opts)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of `vhostmd`: parse, run, exit with upstream's codes."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = command.main(args=args, prog_name=PROG, standalone_mode=False)
    except _UsageExit:
        sys.stderr.write(USAGE)
        sys.exit(EXIT_USAGE)
    except click.ClickException as err:
        # Upstream exits 1 (not getopt's usual 2) on a bad option.
        sys.stderr.write(getopt_message(PROG, err) + "\n" + USAGE)
        sys.exit(EXIT_FAILURE)
    except click.exceptions.Abort:
        sys.exit(EXIT_FAILURE)
    sys.exit(int(code) if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":  # pragma: no cover - `python -m vhostmd_py.cli`
    main()
