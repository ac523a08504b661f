"""Finding the metrics disk: the block device whose first bytes say ``mvbd``.

As upstream's read_mdisk (libmetrics.c) we look at every entry of
``<sys_root>/block`` and read the start of ``<dev_root>/<entry>`` with
O_DIRECT. Unlike upstream we never hang on an odd device: entries whose
size is 0 (an empty CD-ROM tray) are skipped before any open, only block
devices and regular files are opened, and the open is non-blocking.
"""

import logging
import os
import stat
from typing import List, Optional

from vhostmd_wire import disk
from vhostmd_wire.errors import DiskFormatError

from .errors import DiskIOError, DiskNotFoundError, StrPath

log = logging.getLogger(__name__)


def probe(path: StrPath) -> Optional[disk.Header]:
    """The mvbd header of ``path`` if it carries the signature, else None.

    The read is the disk format's own first-block read (non-blocking open,
    O_DIRECT with an aligned buffer where the filesystem allows it);
    DiskIOError when the device cannot be opened or read.
    """
    try:
        header = disk.read_header(path)
    except DiskFormatError:
        return None  # shorter than a header: not a metrics disk
    return header if header.has_signature else None


def _sys_size(sys_block: str, entry: str) -> Optional[int]:
    try:
        with open(os.path.join(sys_block, entry, "size"), "rb") as f:
            return int(f.read().strip() or b"0")
    except (OSError, ValueError):
        return None


def find_metrics_disk(sys_root: StrPath = "/sys", dev_root: StrPath = "/dev") -> str:
    """The device path of the metrics disk (DiskNotFoundError when none carries the signature)."""
    sys_block = os.path.join(os.fspath(sys_root), "block")
    try:
        entries = sorted(os.listdir(sys_block))
    except OSError as err:
        log.debug("cannot list %s: %s", sys_block, err)
        entries = []
    probed: List[str] = []
    for entry in entries:
        if entry.startswith("."):
            continue
        path = os.path.join(os.fspath(dev_root), entry)
        size = _sys_size(sys_block, entry)
        if size == 0:
            # Empty removable media: opening it can block or spin up hardware.
            log.debug("%s: size 0, skipped", path)
            probed.append(f"{entry} (empty)")
            continue
        try:
            st = os.stat(path)
        except OSError as err:
            log.debug("%s: %s, skipped", path, err.strerror)
            probed.append(f"{entry} ({err.strerror})")
            continue
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            # A FIFO or character device here would block or misbehave.
            log.debug("%s: not a block device, skipped", path)
            probed.append(f"{entry} (not a block device)")
            continue
        try:
            header = probe(path)
        except DiskIOError as err:
            log.debug("%s: %s, skipped", path, err.reason)
            probed.append(f"{entry} ({err.reason})")
            continue
        if header is not None:
            log.debug("metrics disk found: %s", path)
            return path
        probed.append(f"{entry} (no signature)")
    raise DiskNotFoundError(sys_root, dev_root, probed)
