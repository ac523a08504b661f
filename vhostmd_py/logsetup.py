"""Logging configuration, done once by the CLI.

Upstream logs with vu_log(): syslog when daemonized, stderr in the
foreground (-d), and -v adds informational lines. We keep the destinations;
-v gives INFO (plus one line per cycle: metrics, VMs, duration) and -vv DEBUG.

At the default level an operator still sees that the daemon is alive: the
start-up line and the first successful publish go to the LIFECYCLE logger,
which stays at INFO whatever -v says (two lines per daemon life, in the
foreground and in syslog alike). Making all of INFO the default would
print every metric's action at start-up (upstream's -v lines); raising these
two lines to WARNING would make them look like a problem.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

SYSLOG_ADDRESS = "/dev/log"
IDENT = "vhostmd"
# The daemon's "started" and "first metrics published" lines (see above).
LIFECYCLE = "vhostmd_py.lifecycle"


def level_for(verbose: int) -> int:
    """The root level for a -v count: 0 WARNING, 1 INFO, 2+ DEBUG."""
    if verbose <= 0:
        return logging.WARNING
    return logging.INFO if verbose == 1 else logging.DEBUG


def setup_logging(
    *,
    verbose: int,
    to_syslog: bool,
    syslog_address: str = SYSLOG_ADDRESS,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send every vhostmd_py log record to syslog (daemon facility) or to STREAM."""
    handler: logging.Handler
    if to_syslog and os.path.exists(syslog_address):
        # Imported here: the foreground daemon (systemd's -d) never needs it,
        # and it costs ~0.6 MB of RSS (bench/README.md, Cycle).
        from logging.handlers import SysLogHandler

        handler = SysLogHandler(address=syslog_address, facility=SysLogHandler.LOG_DAEMON)
        # syslog adds time and host; the ident makes `journalctl -t vhostmd` work.
        handler.ident = f"{IDENT}[{os.getpid()}]: "
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
        handler.setFormatter(logging.Formatter(f"{IDENT}: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_for(verbose))
    # A logger with its own level passes its records to the root's handler
    # even when the root's level is higher: INFO for these lines only.
    logging.getLogger(LIFECYCLE).setLevel(min(logging.INFO, level_for(verbose)))
    logging.captureWarnings(True)
    return handler
