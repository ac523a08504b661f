"""The daemon process's life: start-up order, daemonizing, pid file, privileges, signals.

cli.py parses the command line into Options and calls run(); everything the
process does around the metrics loop (vhostmd_py.daemon) is here, in the
order it happens. The pid file and the privilege drop are one job each
(vhostmd_py.process.pidfile, vhostmd_py.process.privileges); this module calls them.

Start-up order (why): the config is read and checked in the foreground so
its errors reach the terminal; when daemonizing, the final process creates
the pid file (it must hold *its* pid), then the disk, binds the OpenMetrics
endpoint (<metrics_endpoint>; its server thread starts after the fork), then
drops privileges (-u: the disk path and a port below 1024 need root), and
only then tells the waiting parent it is up. So the parent's exit status says
whether the daemon really started, which upstream's (always 0 once forked)
does not. Exit codes are upstream's (FACTS.md section 5): every start-up
failure exits 1.

Signals: what stops and what reloads is vhostmd_py.signals' (shared
with the loop); SIGPIPE is ignored (upstream: a guest closing its channel
must not kill us).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Tuple

from vhostmd_py.errors import ConfigError, PidFileError, StrPath, VhostmdError
from vhostmd_py.signals import HANDLED_SIGNALS, exit_on_stop, held_stop_signals

if TYPE_CHECKING:
    from vhostmd_py.config import Config
    from vhostmd_py.daemon import Daemon
    from vhostmd_py.sources.shell.runner import ActionRunner

log = logging.getLogger(__name__)

PROG = "vhostmd"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

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
    from vhostmd_py.daemon import Daemon, describe_config
    from vhostmd_py.process.memory import one_malloc_arena
    from vhostmd_py.process.pidfile import PidFile

    # Before the first thread starts (csrc/process.c says why).
    arena_limited = one_malloc_arena(os.environ)
    logsetup.setup_logging(verbose=opts.verbose, to_syslog=False)
    log.debug("C allocator: %s", "one arena" if arena_limited else "as the C library chose")
    # Upstream ignores SIGPIPE (a guest closing its channel must not kill us).
    # Actions get the default disposition back when they are spawned.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # Until the event loop takes these over, a stop request during start-up
    # (a 256 MiB disk takes a while to zero) still removes the pid file and
    # clears the disk's busy flag via the finally clause below.
    exit_on_stop()
    try:
        config = load_config(opts.config)
    except VhostmdError as err:
        return _fail(f"{PROG}: {err}")
    for line in describe_config(config):
        log.info("%s", line)
    ident = None
    if opts.user is not None:
        if config.disk_per_vm is not None and not opts.dump:
            # The hook creates each VM's disk as root at the domain's prepare
            # phase; after the drop the daemon could write none of them, and
            # would fail every cycle for every VM. Say so now, once.
            return _fail(
                f"{PROG}: {config.file}: <disk_per_vm> needs the daemon to keep root "
                f"(the libvirt hook creates the disks as root): run without -u {opts.user}, "
                "or remove <disk_per_vm>"
            )
        from vhostmd_py.process.privileges import resolve_user  # only with -u

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
        # The subreaper of what actions leave running (vhostmd_py.sources.shell.orphans).
        reap_orphans=True,
    )
    if opts.once and "virtio" in config.transports:
        # Publishing on virtio means answering guests' requests as they come;
        # a single update has nobody to answer, so --once publishes vbd only.
        log.warning("--once: the virtio transport is not served, only vbd is published")

    notify: Callable[[str | None], None] | None = None
    to_syslog = False
    if opts.daemonize:
        notify = _daemonize()
        handler = logsetup.setup_logging(verbose=opts.verbose, to_syslog=True)
        to_syslog = not isinstance(handler, logging.StreamHandler)

    pid_file: PidFile | None = None
    remover: PidFileRemover | None = None
    try:
        try:
            # A stop signal inside these two would leave an empty pid file or a
            # disk still busy from its creation, before the finally below knows
            # about them: hold the signals until each is done.
            if opts.pid_file is not None:
                with held_stop_signals():
                    pid_file = PidFile.create(opts.pid_file)
            with held_stop_signals():
                daemon.open_disk()
            if ident is not None:
                daemon.set_config_loader(_preload(config))
                if pid_file is not None:
                    remover = PidFileRemover.start(pid_file.path, pid_file.pid)
            if not (opts.once or opts.dump):
                # Bound as root (a port below 1024), after the remover's fork
                # (no server thread in the child), before the drop.
                daemon.open_endpoint()
            if ident is not None:
                from vhostmd_py.process.privileges import drop_privileges

                drop_privileges(ident)
        except VhostmdError as err:
            message = f"{PROG}: {err}"
            if notify is not None:
                if to_syslog:  # else stderr is the parent's, which prints it: once
                    log.error("%s", err)
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
        daemon.close_endpoint()
        daemon.close_disk()
        if remover is not None:
            remover.finish()  # root removes it: after -u we cannot (see PidFileRemover)
        elif pid_file is not None:
            pid_file.remove()


def _fail(message: str) -> int:
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()
    return EXIT_FAILURE


def _runner_factory(opts: Options) -> Callable[[Config], ActionRunner]:
    # The one place the daemon imports the runner binding (and so _runner).
    from vhostmd_py.sources.shell.runner import DEFAULT_TIMEOUT, ActionRunner

    def make(config: Config) -> ActionRunner:
        return ActionRunner(
            path=config.path,
            uri=opts.uri,
            timeout=DEFAULT_TIMEOUT if opts.action_timeout is None else opts.action_timeout,
            max_concurrency=opts.jobs,
        )

    return make


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


# What each feature of a config makes the daemon import, at start-up or in
# any later cycle, scrape or reload (each module's own imports follow). The
# one table: preload() imports exactly these before -u drops root, and the
# daemon imports the same modules lazily where they are used, so a config
# without a feature does not pay for its libraries (bench/bench_footprint.py).
FEATURE_MODULES: Dict[str, Tuple[str, ...]] = {
    # Every daemon: the cycle, its actions (the compiled runner) and their
    # orphans; concurrent.futures.thread is imported on first use of an
    # executor (the runner's batches, the history's close).
    "cycle": (
        "vhostmd_py.cycle.gather",
        "vhostmd_py.cycle.collect",
        "vhostmd_py.cycle.render",
        "vhostmd_py.sources.base",
        "vhostmd_py.sources.shell.runner",
        "vhostmd_py.sources.shell.substitution",
        "vhostmd_py.sources.shell.orphans",
        "concurrent.futures.thread",
    ),
    "vbd": ("vhostmd_py.publish.vbd", "vhostmd_py.publish.mdisk"),
    # The running VMs (vm metrics, virtio, per-VM disks, built-in fields read
    # from libvirt, history, alarms, accounting).
    "libvirt": ("vhostmd_py.sources.vms", "libvirt"),
    "virtio": ("vhostmd_py.publish.virtio.publisher", "vhostmd_py.publish.virtio.server"),
    # Built-in <source> metrics; the history, alarms and accounting read their
    # counters through the same source.
    "builtin": ("vhostmd_py.sources.builtin.source",),
    "history": ("vhostmd_py.history.step",),
    "alarms/accounting": ("vhostmd_py.monitors.step",),
    "freshness": ("vhostmd_py.cycle.freshness",),
    "disk_per_vm": ("vhostmd_py.publish.pervm",),
    "metrics_endpoint": ("vhostmd_py.publish.endpoint",),
    # What each VM may see, and each domain's own policy and alarms (metadata).
    "policy": ("vhostmd_py.publish.policy", "vhostmd_py.sources.metadata",
               "vhostmd_py.config.perfmon", "vhostmd_py.fs"),
}
# Imported when present: without libvirt-python the daemon publishes host
# metrics only (said once by LibvirtVMs), so its absence is no start-up error.
OPTIONAL_MODULES = frozenset({"libvirt"})


def features(config: Config) -> List[str]:
    """The FEATURE_MODULES keys CONFIG uses, in the table's order."""
    sources = [m.source for m in config.metrics if m.source is not None]
    monitors = config.alarms is not None or config.accounting is not None
    counters = config.history is not None or monitors
    used = {
        "cycle": True,
        "vbd": "vbd" in config.transports,
        # The daemon lists the running VMs for these (cycle.gather.needs_vms).
        "libvirt": "virtio" in config.transports
        or any(m.context == "vm" for m in config.metrics)
        # One disk per running VM needs the running VMs.
        or config.disk_per_vm is not None
        # Built-in host fields read from libvirt (node info) need its connection.
        or (bool(sources) and _sources_need_libvirt(sources))
        # The history, alarms and accounting read every VM's counters.
        or counters
        # A policy: what every running VM may see, their metadata.
        or config.policy is not None,
        "virtio": "virtio" in config.transports,
        "builtin": bool(sources) or counters,
        "history": config.history is not None,
        "alarms/accounting": monitors,
        "freshness": config.freshness is not None,
        "disk_per_vm": config.disk_per_vm is not None,
        "metrics_endpoint": config.metrics_endpoint is not None,
        "policy": config.policy is not None,
    }
    return [name for name in FEATURE_MODULES if used[name]]


def _sources_need_libvirt(sources: List[str]) -> bool:
    from vhostmd_py.sources.builtin.catalogue import needs_libvirt

    return needs_libvirt(sources)


def preload(config: Config) -> None:
    """Import what CONFIG's features use (FEATURE_MODULES), now.

    Raises ConfigError naming the feature and the module when one cannot be
    imported (after -u USER: an installation USER cannot read); a missing
    optional module (libvirt-python) is not an error.
    """
    import importlib

    for feature in features(config):
        for name in FEATURE_MODULES[feature]:
            if sys.modules.get(name) is not None:
                continue
            try:
                importlib.import_module(name)
            except (ImportError, OSError) as err:  # OSError: a file it cannot read
                if name in OPTIONAL_MODULES:
                    continue
                raise ConfigError(
                    config.file,
                    f"{feature} needs the module {name}, which cannot be imported now "
                    f"({err}): restart vhostmd to use it",
                ) from err


def _preload(config: Config) -> Callable[[str], Config]:
    """Load now what the daemon would load lazily later; the config loader to reload with.

    After -u USER the unprivileged user may be unable to read the Python
    installation (a Python under /root, a venv in a 0700 directory): an
    import, metric.dtd or vhostmd.dtd read in a later cycle or on SIGHUP
    would then fail every time. What the config's features use is imported
    (preload), metric.dtd parsed once (render.xml_validator), and
    vhostmd.dtd kept open: a reload reads it again through /proc/self/fd,
    which needs no search permission on the directories above it. A reload
    whose config needs a module not imported here (a feature turned on by
    the reload) imports it then; when that fails the reload is refused (one
    line, the old config stays in force) and the operator restarts.
    """
    from vhostmd_py.config import default_dtd_path
    from vhostmd_py.cycle.render import xml_validator

    preload(config)
    xml_validator()
    dtd = default_dtd_path()
    try:
        fd = os.open(dtd, os.O_RDONLY)  # kept for the process's life, by design
    except OSError as err:
        raise ConfigError(dtd, f"cannot open the configuration grammar: {err.strerror}") from err

    def reload_config(path: str) -> Config:
        try:
            new = load_config(path, dtd=f"/proc/self/fd/{fd}")
        except (ImportError, OSError) as err:  # a section whose parser was never imported
            raise ConfigError(
                path, f"reading it needs a module that cannot be imported now ({err}): "
                "restart vhostmd to use it",
            ) from err
        preload(new)
        return new

    return reload_config


class PidFileRemover:
    """A root process that removes the pid file when the daemon (run as -u USER) exits.

    Once the daemon runs as USER it can no longer unlink its pid file (/run,
    /var/run are root's); upstream leaves it behind. This child, forked
    before the drop, keeps root, closes every fd but one pipe, ignores the
    stop signals and waits for the pipe's end: the daemon exiting, however
    (a kill -9 too). Then it removes the file if it still holds the daemon's
    pid, and exits. It runs nothing else and holds nothing else.
    """

    def __init__(self, pid: int, write_end: int) -> None:
        self.pid = pid
        self._write_end = write_end

    @classmethod
    def start(cls, path: str, daemon_pid: int) -> PidFileRemover:
        """Fork the remover for PATH, written with DAEMON_PID."""
        read_end, write_end = os.pipe()
        os.set_inheritable(read_end, False)
        os.set_inheritable(write_end, False)
        try:
            child = os.fork()
        except OSError as err:
            os.close(read_end)
            os.close(write_end)
            raise PidFileError(path, f"cannot start the pid file remover: {err.strerror}") from err
        if child == 0:  # pragma: no cover - runs in the child, exits there
            try:
                for sig in HANDLED_SIGNALS:
                    signal.signal(sig, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_SETMASK, [])
                os.closerange(0, read_end)
                os.closerange(read_end + 1, os.sysconf("SC_OPEN_MAX"))
                while os.read(read_end, 1):
                    pass
                from vhostmd_py.process.pidfile import PidFile

                PidFile(path, daemon_pid).remove()
            finally:
                os._exit(0)
        os.close(read_end)
        return cls(child, write_end)

    def finish(self) -> None:
        """Let the remover do its job and wait for it (the file is gone on return)."""
        if self._write_end >= 0:
            os.close(self._write_end)
            self._write_end = -1
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


class _Catalogue(Mapping[str, Any]):
    """The built-in sources' field table, imported when the first <source> is checked.

    Most configs name no <source>: their daemon never imports the catalogue
    (its tables are a few hundred kB and milliseconds of start-up).
    """

    @staticmethod
    def _table() -> Mapping[str, Any]:
        from vhostmd_py.sources.builtin.catalogue import CATALOGUE

        return CATALOGUE

    def __getitem__(self, name: str) -> Any:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


def load_config(path: StrPath, dtd: StrPath | None = None) -> Config:
    """The config at PATH (validated against DTD, default the shipped one).

    Its ``<source>`` fields are checked against the built-in sources' table,
    handed to the parser here: the config package imports no source.
    """
    from vhostmd_py.config import load_config as load

    return load(path, dtd=dtd, builtin_fields=_Catalogue())


def _dump(daemon: Daemon) -> int:
    from vhostmd_py.cycle.render import document

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
