"""The daemon process's life: start-up order, daemonizing, pid file, privileges, signals.

cli.py parses the command line into Options and calls run(); everything the
process does around the metrics loop (vhostmd_py.daemon) is here, in the
order it happens. The pid file and the privilege drop are one job each
(vhostmd_py.pidfile, vhostmd_py.privileges); this module calls them.

Start-up order (why): the config is read and checked in the foreground so
its errors reach the terminal; when daemonizing, the final process creates
the pid file (it must hold *its* pid), then the disk, then drops privileges
(-u: the disk path usually needs root), and only then tells the waiting
parent it is up. So the parent's exit status says whether the daemon really
started, which upstream's (always 0 once forked) does not. Exit codes are
upstream's (FACTS section 5): every start-up failure exits 1.

Signals: STOP_SIGNALS stop the daemon (upstream: SIGTERM, SIGINT, SIGQUIT),
SIGHUP reloads (ours; upstream has no handler), SIGPIPE is ignored
(upstream: a guest closing its channel must not kill us).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List

from vhostmd_py.errors import VhostmdError

if TYPE_CHECKING:
    from vhostmd_py.config import Config
    from vhostmd_py.daemon import Daemon
    from vhostmd_py.runner import ActionRunner

log = logging.getLogger(__name__)

PROG = "vhostmd"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# The signals that stop the daemon, in every phase of its life.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


@dataclass(frozen=True)
class Options:
    """What the command line asks for (cli.py parses it)."""

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


def run(opts: Options) -> int:
    """Start the daemon as OPTS say, run it until stopped; the process exit status."""
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
    for sig in STOP_SIGNALS:
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
        # The subreaper of what actions leave running (vhostmd_py.orphans).
        reap_orphans=True,
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


def install_loop_signals(
    loop: asyncio.AbstractEventLoop, stop: Callable[[], None], reload: Callable[[], None]
) -> Callable[[], None]:
    """Hand STOP_SIGNALS to STOP and SIGHUP to RELOAD on LOOP; returns the undo.

    remove_signal_handler() resets to SIG_DFL, not to what was there (the
    start-up stop handler of run()): the undo puts that back."""
    saved: Dict[int, Any] = {sig: signal.getsignal(sig) for sig in (*STOP_SIGNALS, signal.SIGHUP)}
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, reload)

    def restore() -> None:
        for sig, previous in saved.items():
            loop.remove_signal_handler(sig)
            if previous is not None:
                signal.signal(sig, previous)

    return restore


def _fail(message: str) -> int:
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()
    return EXIT_FAILURE


def _runner_factory(opts: Options) -> Callable[[Config], ActionRunner]:
    # The one place the daemon imports the runner binding (and so _runner).
    from vhostmd_py.runner import DEFAULT_TIMEOUT, ActionRunner

    def make(config: Config) -> ActionRunner:
        return ActionRunner(
            path=config.path,
            uri=opts.uri,
            timeout=DEFAULT_TIMEOUT if opts.action_timeout is None else opts.action_timeout,
            max_concurrency=opts.jobs,
        )

    return make


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Defer the stop signals until the block is done (then they act)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _preload(config: Config) -> None:
    """Import now what the daemon would import lazily later.

    After -u USER the unprivileged user may be unable to read the Python
    installation (a Python under /root, a venv in a 0700 home), and an import
    in the first cycle would then fail.
    """
    import concurrent.futures.thread  # noqa: F401 - used lazily by the runner

    import vhostmd_py.collector
    import vhostmd_py.orphans
    import vhostmd_py.render
    import vhostmd_py.runner
    import vhostmd_py.sources
    import vhostmd_py.substitution

    if "virtio" in config.transports:
        import vhostmd_py.virtio.server  # noqa: F401
    if "virtio" in config.transports or any(m.context == "vm" for m in config.metrics):
        import libvirt  # noqa: F401


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(EXIT_OK)


def _dump(daemon: Daemon) -> int:
    from vhostmd_py.render import document

    asyncio.run(daemon.run(max_cycles=1))
    if daemon.last_snapshot is None:
        return _fail(f"{PROG}: no metrics collected")
    out = sys.stdout.buffer
    out.write(document(daemon.last_snapshot))
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
