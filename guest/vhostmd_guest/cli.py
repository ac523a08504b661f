"""``vm_dump_metrics`` / ``vm-dump-metrics``: print the metrics the host gives this VM.

Options, source order, output bytes and exit codes as upstream's
vm-dump-metrics (FACTS 3): 0 success, 1 failure (message on stderr), 2 usage
(usage text on stderr, also for --help). Upstream's ``LIBMETRICS: ...``
lines are kept where we fail the same way, next to a line saying why.
Deviations (README): a disk that stays busy fails after --busy-timeout
instead of hanging; a wrong checksum fails; disks under 64 KiB read fine;
-x works through the xenstore command-line tools.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any, Callable, List, Sequence

import click

from vhostmd_py.getopt_wording import getopt_message

from .errors import (
    DestinationError,
    DocumentError,
    MetricsError,
    VirtioBusyError,
    VirtioOpenError,
    VirtioTimeoutError,
)
from .libmetrics import write_metrics
from .reader import (
    DEFAULT_BUSY_TIMEOUT,
    DiskSource,
    VirtioSource,
    fetch_disk_metrics,
    fetch_virtio_metrics,
    fetch_xenstore_metrics,
)
from .virtio import DEFAULT_PORT, DEFAULT_TIMEOUT
from .xenstore import find_tool

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

# Upstream's usage() as built WITH_XENSTORE (our -x works), then our additions.
_OPTIONS = (
    "\t-v | --verbose         Verbose messages.\n"
    "\t-d | --dest            Metrics destination file .\n"
    "\t-x | --xenstore        Get metrics from xenstore.\n"
    "\t-i | --virtio          Get metrics from virtio channel.\n"
    "\t-b | --vbd             Get metrics from vbd.\n"
    "\t     --disk PATH       Metrics disk (device or file); default: search /sys/block.\n"
    f"\t     --port PATH       virtio port (default {DEFAULT_PORT}).\n"
    "\t     --busy-timeout S  Fail when the disk stays busy S seconds"
    f" (default {DEFAULT_BUSY_TIMEOUT:g}).\n"
    "\t     --virtio-timeout S  Wait S seconds for the host's virtio reply"
    f" (default {DEFAULT_TIMEOUT:g}).\n"
    "\t     --sys-root DIR    sysfs root used to find the disk (default /sys).\n"
    "\t     --dev-root DIR    device directory used to find the disk (default /dev).\n"
    "\t-h | --help            Show this text.\n"
)


def usage_text(prog: str) -> str:
    """The usage text, laid out as upstream's (leading blank line, tab-indented options)."""
    return f"\nUsage: {prog} [options]\n\nOptions:\n{_OPTIONS}\n"


Say = Callable[[str], None]


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _from_disk(prog: str, source: DiskSource, say: Say) -> bytes | None:
    try:
        path, content = fetch_disk_metrics(source)
    except DocumentError as err:
        say(f"{prog}: {err}")
        say("LIBMETRICS: read_mdisk(): libxml failed to parse mdisk.xml buffer")
        say("LIBMETRICS: read_mdisk(): Unable to read metrics disk")
        return None
    except MetricsError as err:
        say(f"{prog}: {err}")
        say("LIBMETRICS: read_mdisk(): Unable to read metrics disk")
        return None
    log.debug("read %d content bytes from metrics disk %s", len(content), path)
    return content


def _from_virtio(prog: str, source: VirtioSource, say: Say) -> bytes | None:
    try:
        reply = fetch_virtio_metrics(source)
    except VirtioOpenError as err:
        say(
            "LIBMETRICS: get_virtio_metrics(): Unable to export metrics: "
            f"open({err.port}) {err.strerror}"
        )
        if isinstance(err, VirtioBusyError):
            say(f"{prog}: {err}")
        say("LIBMETRICS: get_virtio_metrics(): Unable to read metrics")
        return None
    except MetricsError as err:
        if isinstance(err, VirtioTimeoutError):
            say(
                "LIBMETRICS: get_virtio_metrics(): Unable to read metrics"
                f" - timeout after {err.timeout:g}s"
            )
        say(f"{prog}: {err}")
        say("LIBMETRICS: get_virtio_metrics(): Unable to read metrics")
        return None
    log.debug("read a %d-byte reply from virtio port %s", len(reply), source.port)
    return reply


def _from_xenstore(prog: str, say: Say) -> bytes | None:
    try:
        return fetch_xenstore_metrics()
    except MetricsError as err:
        say(f"{prog}: xenstore: {err}")
        return None


def _write(prog: str, data: bytes, dest: str | None, kind: str, say: Say) -> int:
    try:
        write_metrics(data, dest)
    except DestinationError as err:
        strerror = os.strerror(err.errno) if err.errno else err.reason
        if dest is None:
            say(f"LIBMETRICS: Error, unable to export metrics to file:stdout - error:{strerror}")
            _detach_stdout()
        elif kind == "virtio":
            say(
                "LIBMETRICS: dump_virtio_metrics(), unable to dump metrics: "
                f"fopen({dest}) {strerror}"
            )
        elif kind == "xenstore":
            say(f"LIBMETRICS: Error, unable to dump metrics from xenstore: {strerror}")
        else:
            say(f"LIBMETRICS: Error, unable to dump metrics: {strerror}")
        say(f"{prog}: {err}")
        return EXIT_FAIL
    return EXIT_OK


def _detach_stdout() -> None:
    # After EPIPE/EIO on stdout, the interpreter's final flush must not fail again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def run(
    prog: str,
    *,
    dest: str | None,
    vbd: bool,
    virtio: bool,
    xenstore: bool,
    disk: str | None,
    port: str,
    busy_timeout: float,
    virtio_timeout: float,
    sys_root: str,
    dev_root: str,
    say: Say = _say,
) -> int:
    """Fetch from the chosen source(s) and write the result; returns the exit status."""
    disk_source = DiskSource(
        path=disk, sys_root=sys_root, dev_root=dev_root, busy_timeout=busy_timeout
    )
    virtio_source = VirtioSource(port=port, timeout=virtio_timeout)
    # Upstream's precedence when several flags are given: xenstore, virtio, vbd.
    if xenstore:
        chain = ["xenstore"]
    elif virtio:
        chain = ["virtio"]
    elif vbd:
        chain = ["disk"]
    else:
        # No flag: disk, then virtio, then xenstore (upstream's order). A
        # KVM guest has no xenstore tools: then that last step is skipped
        # silently, as in upstream's build without xenstore.
        chain = ["disk", "virtio"] + (["xenstore"] if find_tool() else [])
    for kind in chain:
        if kind == "disk":
            data = _from_disk(prog, disk_source, say)
        elif kind == "virtio":
            data = _from_virtio(prog, virtio_source, say)
        else:
            data = _from_xenstore(prog, say)
        if data is not None:
            # A destination that cannot be written is final: reading another
            # source would not help (upstream went on to try virtio).
            return _write(prog, data, dest, kind, say)
    return EXIT_FAIL


class _Seconds(click.FloatRange):
    """A finite, non-negative number of seconds.

    click's FloatRange lets "nan" through (every comparison with it is
    false), and a nan timeout would make a busy disk hang the tool forever.
    """

    name = "seconds"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        seconds = float(super().convert(value, param, ctx))
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return seconds


@click.command(add_help_option=False)
@click.option("-v", "--verbose", is_flag=True)
@click.option("-d", "--dest", type=str, default=None)
@click.option("-b", "--vbd", is_flag=True)
@click.option("-i", "--virtio", is_flag=True)
@click.option("-x", "--xenstore", is_flag=True)
@click.option("--disk", type=str, default=None)
@click.option("--port", type=str, default=DEFAULT_PORT)
@click.option("--busy-timeout", type=_Seconds(min=0.0), default=DEFAULT_BUSY_TIMEOUT)
@click.option("--virtio-timeout", type=_Seconds(min=0.0), default=DEFAULT_TIMEOUT)
@click.option("--sys-root", type=str, default="/sys")
@click.option("--dev-root", type=str, default="/dev")
@click.option("-h", "--help", "show_help", is_flag=True)
@click.pass_context
def command(
    ctx: click.Context,
    verbose: bool,
    dest: str | None,
    vbd: bool,
    virtio: bool,
    xenstore: bool,
    disk: str | None,
    port: str,
    busy_timeout: float,
    virtio_timeout: float,
    sys_root: str,
    dev_root: str,
    show_help: bool,
) -> int:
    """Dump the metrics the host provides to this VM."""
    prog = ctx.info_name or "vm-dump-metrics"
    if show_help:
        # Upstream: --help prints the usage on stderr and exits 2.
        sys.stderr.write(usage_text(prog))
        return EXIT_USAGE
    _setup_logging(prog, verbose)
    return run(
        prog,
        dest=dest,
        vbd=vbd,
        virtio=virtio,
        xenstore=xenstore,
        disk=disk,
        port=port,
        busy_timeout=busy_timeout,
        virtio_timeout=virtio_timeout,
        sys_root=sys_root,
        dev_root=dev_root,
    )


def _setup_logging(prog: str, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    root = logging.getLogger("vhostmd_guest")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point of vm_dump_metrics / vm-dump-metrics."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "vm-dump-metrics"
    if prog in ("", "-c", "__main__.py", "cli.py"):
        prog = "vm-dump-metrics"
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    try:
        status = command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.UsageError as err:
        sys.stderr.write(getopt_message(prog, err) + "\n" + usage_text(prog))
        status = EXIT_USAGE
    except click.Abort:
        sys.stderr.write(f"{prog}: interrupted\n")
        status = 130
    sys.exit(status if isinstance(status, int) else EXIT_FAIL)
