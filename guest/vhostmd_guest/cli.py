"""``vm_dump_metrics`` / ``vm-dump-metrics``: print the metrics the host gives this VM.

Options, source order, output bytes and exit codes as upstream's
vm-dump-metrics (FACTS.md section 3): 0 success, 1 failure (message on stderr), 2 usage
(usage text on stderr, also for --help). Upstream's ``LIBMETRICS: ...``
lines are kept where we fail the same way, next to a line saying why.
Deviations (docs/COMPATIBILITY.md, Guest): a disk that stays busy fails after --busy-timeout
instead of hanging; a wrong checksum fails; disks under 64 KiB read fine;
-x works through the xenstore command-line tools.
"""

import logging
import math
import os
import shutil
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, TextIO

from vhostmd_wire import getopt_long

from . import __version__
from .document import MAX_DISK_DOCUMENT, MAX_VIRTIO_DOCUMENT, MetricsDocument, parse_document
from .errors import (
    DestinationError,
    DocumentError,
    MetricsError,
    VirtioBusyError,
    VirtioOpenError,
    VirtioTimeoutError,
)
from .freshness import StaleTracker
from .libmetrics import write_metrics
from .reader import (
    DEFAULT_BUSY_TIMEOUT,
    DiskSource,
    VirtioSource,
    fetch_disk_metrics,
    fetch_virtio_metrics,
    fetch_xenstore_metrics,
)
from .views import render_table, to_json, to_openmetrics
from .virtio import DEFAULT_PORT, DEFAULT_TIMEOUT
from .xenstore import find_tool

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
FORMATS = ("xml", "json", "openmetrics")
# ANSI: cursor home, clear screen (only written when stdout is a terminal).
CLEAR_SCREEN = "\x1b[H\x1b[2J"

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
    "\t     --format FMT      Output format: xml (default, as read), json, openmetrics.\n"
    "\t     --watch S         Show a table of the metrics every S seconds until Ctrl-C.\n"
    "\t-h | --help            Show this text.\n"
    "\t     --version         Print the version and exit.\n"
)


def usage_text(prog: str) -> str:
    """The usage text, laid out as upstream's (leading blank line, tab-indented options)."""
    return f"\nUsage: {prog} [options]\n\nOptions:\n{_OPTIONS}\n"


Say = Callable[[str], None]


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _from_disk(prog: str, source: DiskSource, say: Say) -> Optional[bytes]:
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


def _from_virtio(prog: str, source: VirtioSource, say: Say) -> Optional[bytes]:
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


def _from_xenstore(prog: str, say: Say) -> Optional[bytes]:
    try:
        return fetch_xenstore_metrics()
    except MetricsError as err:
        say(f"{prog}: xenstore: {err}")
        return None


def _write(prog: str, data: bytes, dest: Optional[str], kind: str, say: Say) -> int:
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
    dest: Optional[str],
    vbd: bool,
    virtio: bool,
    xenstore: bool,
    disk: Optional[str],
    port: str,
    busy_timeout: float,
    virtio_timeout: float,
    sys_root: str,
    dev_root: str,
    fmt: str = "xml",
    watch: Optional[float] = None,
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
    if watch is not None:
        return watch_metrics(watch, chain, disk_source, virtio_source)
    for kind in chain:
        if kind == "disk":
            data = _from_disk(prog, disk_source, say)
        elif kind == "virtio":
            data = _from_virtio(prog, virtio_source, say)
        else:
            data = _from_xenstore(prog, say)
        if data is not None:
            if fmt != "xml":
                try:
                    data = _render(_parse(kind, data), fmt)
                except MetricsError as err:
                    say(f"{prog}: {err}")
                    return EXIT_FAIL
            # A destination that cannot be written is final: reading another
            # source would not help (upstream went on to try virtio).
            return _write(prog, data, dest, kind, say)
    return EXIT_FAIL


def _parse(kind: str, data: bytes) -> MetricsDocument:
    if kind == "disk":
        return parse_document(data, source="metrics disk", max_size=MAX_DISK_DOCUMENT)
    source = "virtio port" if kind == "virtio" else "xenstore"
    return parse_document(data, source=source, max_size=MAX_VIRTIO_DOCUMENT)


def _render(doc: MetricsDocument, fmt: str) -> bytes:
    text = to_json(doc) if fmt == "json" else to_openmetrics(doc)
    return text.encode("utf-8")


def _fetch_document(
    chain: Sequence[str], disk_source: DiskSource, virtio_source: VirtioSource
) -> MetricsDocument:
    """The first source of the chain that gives a document; MetricsError naming every failure."""
    errors: List[str] = []
    for kind in chain:
        try:
            if kind == "disk":
                path, content = fetch_disk_metrics(disk_source)
                return parse_document(content, source=f"metrics disk {path}")
            if kind == "virtio":
                reply = fetch_virtio_metrics(virtio_source)
                return parse_document(
                    reply, source=f"virtio port {virtio_source.port}", max_size=MAX_VIRTIO_DOCUMENT
                )
            return _parse(kind, fetch_xenstore_metrics())
        except MetricsError as err:
            errors.append(str(err))
    raise MetricsError("; ".join(errors) or "no source to read")


def watch_metrics(
    interval: float,
    chain: Sequence[str],
    disk_source: DiskSource,
    virtio_source: VirtioSource,
    *,
    out: Optional[TextIO] = None,
    frames: Optional[int] = None,
) -> int:
    """--watch: a table every ``interval`` seconds until Ctrl-C (exit 0) or ``frames`` frames.

    On a terminal each frame replaces the last (ANSI home + clear); otherwise
    frames follow each other, separated by a blank line. A failed read is
    shown in the frame (with the last document read, if any) and the watch
    goes on: a busy or corrupt disk is often a passing state.
    """
    stream = sys.stdout if out is None else out
    tty = stream.isatty()
    tracker = StaleTracker(time.monotonic)
    last: Optional[MetricsDocument] = None
    shown = 0
    try:
        while frames is None or shown < frames:
            error: Optional[str] = None
            try:
                last = _fetch_document(chain, disk_source, virtio_source)
                unchanged = tracker.observe(last.raw)
            except MetricsError as err:
                error = str(err)
                unchanged = tracker.unchanged_for()
            width = shutil.get_terminal_size().columns if tty else 1 << 16
            frame = render_table(
                last, now=time.time(), unchanged_for=unchanged, error=error, width=width
            )
            if tty:
                stream.write(CLEAR_SCREEN + frame)
            else:
                stream.write(("\n" if shown else "") + frame)
            stream.flush()
            shown += 1
            if frames is None or shown < frames:
                time.sleep(interval)
    except KeyboardInterrupt:
        # Ctrl-C is how a watch ends: a clean exit, the last frame stays.
        return EXIT_OK
    except OSError as err:  # stdout gone (closed pipe, hang-up)
        log.debug("watch: output failed: %s", err)
        _detach_stdout()
        return EXIT_FAIL
    return EXIT_OK


# getopt_long's table: short options, then long options ("=" takes a value).
_SHORT = "vd:bixh"
_LONG = (
    "verbose",
    "dest=",
    "vbd",
    "virtio",
    "xenstore",
    "disk=",
    "port=",
    "busy-timeout=",
    "virtio-timeout=",
    "sys-root=",
    "dev-root=",
    "format=",
    "watch=",
    "help",
)
_SHORT_TO_LONG = {
    "-v": "--verbose",
    "-d": "--dest",
    "-b": "--vbd",
    "-i": "--virtio",
    "-x": "--xenstore",
    "-h": "--help",
}


class UsageError(Exception):
    """A bad command line; the message is worded as glibc's getopt_long words it."""


def _seconds(option: str, value: str) -> float:
    """A finite, non-negative number of seconds: a nan timeout would make a busy disk hang."""
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError(f"Invalid value for '{option}': {value!r} is not a valid float.") from None
    if not math.isfinite(seconds):
        raise UsageError(
            f"Invalid value for '{option}': {value!r} is not a finite number of seconds"
        )
    if seconds < 0:
        raise UsageError(f"Invalid value for '{option}': {seconds} is not in the range x>=0.")
    return seconds


def parse_args(args: Sequence[str]) -> Dict[str, Optional[str]]:
    """The options given, by long name (flags map to ""); UsageError for a bad command line."""
    try:
        # --version is ours, not upstream's: "--ve"/"--ver" stay --verbose.
        pairs, rest = getopt_long.parse(args, _SHORT, _LONG, ("version",))
    except getopt_long.OptionError as err:
        raise UsageError(str(err)) from None
    if rest:
        # Upstream ignores operands; the click front end refused them, and so do we.
        raise UsageError(
            f"Got unexpected extra argument{'s' if len(rest) > 1 else ''} ({' '.join(rest)})"
        )
    given: Dict[str, Optional[str]] = {}
    for opt, value in pairs:
        given[_SHORT_TO_LONG.get(opt, opt)] = value
    return given


def command(prog: str, args: Sequence[str]) -> int:
    """Run vm-dump-metrics with args; the exit status (UsageError for a bad command line)."""
    given = parse_args(args)
    if "--version" in given:
        sys.stdout.write(f"{prog} (vhostmd-py-guest) {__version__}\n")
        return EXIT_OK
    if "--help" in given:
        # Upstream: --help prints the usage on stderr and exits 2.
        sys.stderr.write(usage_text(prog))
        return EXIT_USAGE
    busy_timeout = DEFAULT_BUSY_TIMEOUT
    virtio_timeout = DEFAULT_TIMEOUT
    # Checked in command-line order, as the first bad value is reported.
    for option in ("--busy-timeout", "--virtio-timeout"):
        raw = given.get(option)
        if raw is not None:
            if option == "--busy-timeout":
                busy_timeout = _seconds(option, raw)
            else:
                virtio_timeout = _seconds(option, raw)
    fmt = given.get("--format")
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(
            f"Invalid value for '--format': {fmt!r} is not one of "
            + ", ".join(repr(f) for f in FORMATS)
            + "."
        )
    watch: Optional[float] = None
    if given.get("--watch") is not None:
        watch = _seconds("--watch", given["--watch"] or "")
        if watch <= 0:
            raise UsageError(f"Invalid value for '--watch': {watch} is not in the range x>0.")
        if fmt is not None or "--dest" in given:
            raise UsageError("--watch shows a table on standard output: no --format or --dest")
    _setup_logging(prog, "--verbose" in given)
    return run(
        prog,
        dest=given.get("--dest"),
        vbd="--vbd" in given,
        virtio="--virtio" in given,
        xenstore="--xenstore" in given,
        disk=given.get("--disk"),
        port=given.get("--port") or DEFAULT_PORT,
        busy_timeout=busy_timeout,
        virtio_timeout=virtio_timeout,
        sys_root=given.get("--sys-root") or "/sys",
        dev_root=given.get("--dev-root") or "/dev",
        fmt=fmt or "xml",
        watch=watch,
    )


def _setup_logging(prog: str, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    root = logging.getLogger("vhostmd_guest")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.propagate = False


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point of vm_dump_metrics / vm-dump-metrics."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "vm-dump-metrics"
    if prog.endswith(".pyz"):  # the single-file build: python3 vm-dump-metrics.pyz
        prog = prog[: -len(".pyz")]
    if prog in ("", "-c", "__main__.py", "cli.py"):
        prog = "vm-dump-metrics"
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    try:
        status = command(prog, args)
    except UsageError as err:
        sys.stderr.write(f"{prog}: {err}\n" + usage_text(prog))
        status = EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        status = 130
    sys.exit(status)
