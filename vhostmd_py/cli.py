"""`vhostmd`: the host daemon's command line, upstream's options plus a few.

Upstream's options and exit codes (FACTS section 5, golden daemon-cli/):
-h prints the usage on stderr and exits 2; an unknown option exits 1; every
start-up failure (config, disk, pid file) exits 1. Added: --once, --dump,
--jobs, --action-timeout.

Start-up order (why): the config is read and checked in the foreground so
its errors reach the terminal; when daemonizing, the final process creates
the pid file (it must hold *its* pid), then the disk, then drops privileges
(-u: the disk path usually needs root), and only then tells the waiting
parent it is up. So the parent's exit status says whether the daemon really
started, which upstream's (always 0 once forked) does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, List, NoReturn, Sequence

import click

from vhostmd_py.errors import VhostmdError
from vhostmd_py.getopt_wording import getopt_message

if TYPE_CHECKING:
    from vhostmd_py.actions import ActionRunner
    from vhostmd_py.config import Config
    from vhostmd_py.daemon import Daemon

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "/etc/vhostmd/vhostmd.conf"
DEFAULT_PID_FILE = "/var/run/vhostmd.pid"
PROG = "vhostmd"

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
    "   \n"
    "   Host metrics gathering daemon:\n"
    "   \n"
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


@dataclass(frozen=True)
class Options:
    """The parsed command line."""

    verbose: int
    daemonize: bool
    config: str
    pid_file: str | None
    user: str | None
    uri: str | None
    once: bool
    dump: bool
    jobs: int | None
    action_timeout: float | None


class _UsageExit(Exception):
    """-h/--help: the usage on stderr, exit 2 (upstream)."""


def _help(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        raise _UsageExit()


@click.command(context_settings={"help_option_names": []}, add_help_option=False)
@click.option(
    "-h", "--help", "show_help", is_flag=True, expose_value=False, is_eager=True, callback=_help
)
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
    if pid_file is None and daemonize and os.geteuid() == 0:
        pid_file = DEFAULT_PID_FILE
    if daemonize:
        # The daemon chdirs to /: a relative -f (re-read on SIGHUP) or -p must
        # still name the file the user meant.
        config = os.path.abspath(config)
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


def _fail(message: str) -> int:
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()
    return EXIT_FAILURE


def _runner_factory(opts: Options) -> Callable[[Config], ActionRunner]:
    from vhostmd_py.actions import DEFAULT_TIMEOUT, ActionRunner

    def make(config: Config) -> ActionRunner:
        return ActionRunner(
            path=config.path,
            uri=opts.uri,
            timeout=DEFAULT_TIMEOUT if opts.action_timeout is None else opts.action_timeout,
            max_concurrency=opts.jobs,
        )

    return make


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Defer SIGTERM/SIGINT/SIGQUIT until the block is done (then they act)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def run(opts: Options) -> int:
    """Start the daemon as OPTS say; the process exit status."""
    from vhostmd_py import logsetup
    from vhostmd_py.config import load_config
    from vhostmd_py.daemon import Daemon, describe_config
    from vhostmd_py.pidfile import PidFile
    from vhostmd_py.privileges import drop_privileges, resolve_user

    logsetup.setup_logging(verbose=opts.verbose, to_syslog=False)
    # Upstream ignores SIGPIPE (a guest closing its channel must not kill us).
    # Actions get the default disposition back when they are spawned.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # Until the event loop takes these over, a stop request during start-up
    # (a 256 MiB disk takes a while to zero) still removes the pid file and
    # clears the disk's busy flag via the finally clause below.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, _exit_on_signal)
    try:
        config = load_config(opts.config)
    except VhostmdError as err:
        return _fail(f"{PROG}: {err}")
    for line in describe_config(config):
        log.info("%s", line)
    ident = None
    if opts.user is not None:
        try:
            ident = resolve_user(opts.user)
        except VhostmdError as err:
            return _fail(f"{PROG}: {err}")

    daemon = Daemon(
        config,
        uri=opts.uri,
        runner_factory=_runner_factory(opts),
        config_loader=load_config,
        publish=not opts.dump,
        use_virtio=not opts.once,
    )
    if opts.once and "virtio" in config.transports:
        # Publishing on virtio means answering guests' requests as they come;
        # a single update has nobody to answer, so --once publishes vbd only.
        log.warning("--once: the virtio transport is not served, only vbd is published")

    notify: Callable[[str | None], None] | None = None
    if opts.daemonize:
        notify = _daemonize()
        logsetup.setup_logging(verbose=opts.verbose, to_syslog=True)

    pid_file: PidFile | None = None
    try:
        try:
            # A stop signal inside these two would leave an empty pid file or a
            # disk still busy from its creation, before the finally below knows
            # about them: hold the signals until each is done.
            if opts.pid_file is not None:
                with _stop_signals_held():
                    pid_file = PidFile.create(opts.pid_file)
            with _stop_signals_held():
                daemon.open_disk()
            if ident is not None:
                _preload(config)
                drop_privileges(ident)
        except VhostmdError as err:
            message = f"{PROG}: {err}"
            if notify is not None:
                log.error("%s", err)  # syslog; the waiting parent prints it on stderr
                notify(message)
                return EXIT_FAILURE
            return _fail(message)
        if notify is not None:
            notify(None)
        if not opts.dump:
            _log_started(opts, config)
        try:
            if opts.dump:
                return _dump(daemon)
            asyncio.run(daemon.run(max_cycles=1 if opts.once else None))
        except (OSError, VhostmdError) as err:
            # e.g. the virtio transport cannot start; logged, not a traceback.
            log.error("%s", err)
            return EXIT_FAILURE
        if opts.once and daemon.last_publish_ok is False:
            return EXIT_FAILURE  # the error is logged; a one-shot caller must see it
        return EXIT_OK
    finally:
        daemon.close_disk()
        if pid_file is not None:
            pid_file.remove()


def _log_started(opts: Options, config: Config) -> None:
    """The start-up line, shown at the default level (logsetup.LIFECYCLE)."""
    from vhostmd_py import __version__, logsetup

    disk = f", disk {config.disk_path}" if "vbd" in config.transports else ""
    logging.getLogger(logsetup.LIFECYCLE).info(
        "vhostmd-py %s started (pid %d): %s, %d metrics, every %d s, transports %s%s, libvirt %s",
        __version__,
        os.getpid(),
        config.file,
        len(config.metrics),
        config.update_period,
        ",".join(config.transports),
        disk,
        opts.uri or "(default URI)",
    )


def _preload(config: Config) -> None:
    """Import now what the daemon would import lazily later.

    After -u USER the unprivileged user may be unable to read the Python
    installation (a Python under /root, a venv in a 0700 home), and an import
    in the first cycle would then fail.
    """
    import concurrent.futures.thread  # noqa: F401 - used lazily by actions

    import vhostmd_py.actions
    import vhostmd_py.collector
    import vhostmd_py.document
    import vhostmd_py.sources

    if "virtio" in config.transports:
        import vhostmd_py.virtio  # noqa: F401
    if "virtio" in config.transports or any(m.context == "vm" for m in config.metrics):
        # Without libvirt-python the daemon publishes host metrics only (said
        # once by LibvirtVMs); -u must not turn that into a start-up failure.
        with contextlib.suppress(ImportError):
            import libvirt  # noqa: F401


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(EXIT_OK)


def _dump(daemon: Daemon) -> int:
    asyncio.run(daemon.run(max_cycles=1))
    if daemon.last_snapshot is None:
        return _fail(f"{PROG}: no metrics collected")
    out = sys.stdout.buffer
    out.write(daemon.last_snapshot.document())
    out.flush()
    return EXIT_OK


def _daemonize() -> Callable[[str | None], None]:
    """Double fork, setsid, chdir /, umask 022; the parent exits with the start-up status.

    Returns, in the final process, `notify(error)`: None reports success (the
    parent exits 0), a message reports failure (the parent prints it, exits 1).
    notify also detaches stdin/stdout/stderr to /dev/null.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    first = os.fork()
    if first > 0:
        os.close(write_end)
        os.waitpid(first, 0)
        chunks: List[bytes] = []
        while True:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        status = b"".join(chunks).decode("utf-8", "replace")
        if status == "OK":
            os._exit(EXIT_OK)
        if not status:
            status = f"{PROG}: the daemon exited during start-up"
        os.write(2, (status.rstrip("\n") + "\n").encode("utf-8", "replace"))
        os._exit(EXIT_FAILURE)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(EXIT_OK)
    os.chdir("/")
    os.umask(0o022)

    def notify(error: str | None) -> None:
        os.write(write_end, b"OK" if error is None else error.encode("utf-8", "replace"))
        os.close(write_end)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        if null > 2:
            os.close(null)

    return notify


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
