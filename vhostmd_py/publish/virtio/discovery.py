"""Finding each VM's virtio-serial socket: channel directories, inotify, matching.

QEMU creates one listening UNIX socket per VM (channel target name
``org.github.vhostmd.1``). Libvirt puts it in ``<channel_path>/domain-<id>-<name>/``
(libvirt < 9.7) or ``<channel_path>/<id>-<name>/`` (libvirt >= 9.7), with the
name shortened to 20 characters; the live domain XML may name it directly.

Deliberate differences from upstream (docs/COMPATIBILITY.md, virtio-serial):
- a socket is found as soon as it appears (inotify on the channel
  directories, else polling every poll interval) instead of on a 3-second scan;
- a directory matches a VM by id AND name (upstream: id alone, so the stale
  ``domain-3-oldvm`` of a VM that is gone would get the metrics of whichever
  VM now has id 3).

This module says WHEN to look (scan_due, the inotify callback) and WHERE
(socket_paths); connecting is vhostmd_py.publish.virtio.server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import re
import struct
from typing import Callable, Dict, Iterator, List, Tuple

from vhostmd_wire.protocol import CHANNEL_NAME

from vhostmd_py.sources.vm import VM

logger = logging.getLogger(__name__)

# libvirt's virDomainDefGetShortName: VIR_DOMAIN_SHORT_NAME_MAX = 20.
SHORT_NAME_MAX = 20

# With inotify, the channel directories are re-read on their events (rate
# limited to one scan per poll interval) and otherwise only every
# FULL_SCAN_INTERVAL as a safety net: 1000 running VMs without a vhostmd
# channel (their directory holds only the guest agent's socket) cost 15-19 %
# of a CPU when polled every 50 ms, under 1 % this way (bench/README.md).
# Without inotify (or past its watch limit) we poll every poll interval.
FULL_SCAN_INTERVAL = 3.0

_DIR_RE = re.compile(rb"\A(?:domain-)?([0-9]{1,10})-(.+)\Z", re.DOTALL)

# What scan() found: channel_path's entries by VM id, (directory name, name part).
Entries = Dict[int, List[Tuple[bytes, bytes]]]


def parse_channel_dir(entry: bytes) -> Tuple[int, bytes] | None:
    """(id, name part) of a 'domain-<id>-<name>' or '<id>-<name>' directory name, else None."""
    m = _DIR_RE.match(entry)
    if m is None:
        return None
    vm_id = int(m.group(1))
    if vm_id <= 0:
        return None
    return vm_id, m.group(2)


def name_matches(part: bytes, name: str) -> bool:
    """Whether a directory's name part is libvirt's (possibly shortened) form of NAME."""
    full = name.encode("utf-8", "surrogateescape")
    if part == full:
        return True
    # virDomainDefGetShortName keeps the first 20 characters when the locale
    # decodes the name, else the first 20 bytes; accept exactly those forms.
    short_chars = name[:SHORT_NAME_MAX].encode("utf-8", "surrogateescape")
    return part in (short_chars, full[:SHORT_NAME_MAX])


_IN_MODIFY_MASK = 0x00000004 | 0x00000080 | 0x00000100  # IN_ATTRIB | IN_MOVED_TO | IN_CREATE
_IN_Q_OVERFLOW = 0x00004000
_IN_IGNORED = 0x00008000
_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)


class Inotify:
    """The few inotify calls we need, through libc (no extra dependency)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._init1 = libc.inotify_init1
        self._init1.argtypes = [ctypes.c_int]
        self._init1.restype = ctypes.c_int
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._add.restype = ctypes.c_int
        fd = self._init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd = fd

    def add_watch(self, path: bytes) -> int:
        """Watch directory PATH for entries created, moved in or changed; the watch id."""
        wd = self._add(self.fd, path, _IN_MODIFY_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return int(wd)

    def read_events(self) -> List[Tuple[int, int]]:
        """(watch id, mask) of every pending event."""
        events: List[Tuple[int, int]] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                return events
            pos = 0
            while pos + _EVENT_HEADER.size <= len(data):
                wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, pos)
                events.append((wd, mask))
                pos += _EVENT_HEADER.size + length

    def close(self) -> None:
        """Release the inotify descriptor (Linux releases it even when close() fails)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


class ChannelDiscovery:
    """When to look for sockets and where: the channel directory, its watches, the matching.

    ``on_change`` is called (on the loop) when a watched directory changed and
    the last pass is at least ``poll_interval`` old: the server then runs a
    discovery pass at once instead of on its next tick.
    """

    def __init__(
        self,
        channel_path: str,
        *,
        poll_interval: float,
        use_inotify: bool,
    ) -> None:
        self.dir = os.fsencode(channel_path)
        self._poll = poll_interval
        self._use_inotify = use_inotify
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_change: Callable[[], None] | None = None
        self._inotify: Inotify | None = None
        self._watched: Dict[bytes, int] = {}
        self._watch_paths: Dict[int, bytes] = {}
        self._dirty = True
        self._next_full_scan = 0.0
        self._last_scan = float("-inf")
        self._blind = False  # a socket directory we could not watch: poll
        self._dir_error: int | None = None

    def start(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[], None]) -> None:
        """Set up inotify on LOOP when wanted and available (else we poll)."""
        self._loop = loop
        self._on_change = on_change
        if not self._use_inotify:
            return
        try:
            self._inotify = Inotify()
        except (OSError, AttributeError) as err:
            logger.info("inotify unavailable (%s): polling the channel directory", err)
        else:
            loop.add_reader(self._inotify.fd, self._on_dir_events)

    def stop(self) -> None:
        """Drop inotify and every watch (from then on: polling, if anything)."""
        inotify, self._inotify = self._inotify, None
        if inotify is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(inotify.fd)
        inotify.close()
        self._watched.clear()
        self._watch_paths.clear()

    def scan_due(self, now: float) -> bool:
        """Whether the periodic tick must run a full pass now."""
        if self._inotify is None or self.dir not in self._watched or self._blind:
            return True  # polling: a directory we need has no (working) watch
        return self._dirty or now >= self._next_full_scan

    def begin_pass(self, now: float) -> None:
        """A full pass starts: the next safety-net pass is FULL_SCAN_INTERVAL away."""
        self._dirty = False
        self._next_full_scan = now + FULL_SCAN_INTERVAL
        if self._loop is not None:
            self._last_scan = self._loop.time()

    def watch_root(self) -> None:
        """Watch channel_path itself (QEMU creates the VM directories in it)."""
        self._watch(self.dir)
        self._blind = False

    def socket_paths(self, vm: VM, entries: Callable[[], Entries]) -> Iterator[bytes]:
        """VM's candidate socket paths, best first, each directory watched before it is yielded.

        ENTRIES gives the pass's (cached) listing of channel_path."""
        paths: List[bytes]
        if vm.channel_path:
            # libvirt told us where QEMU listens: that wins over guessing.
            paths = [os.fsencode(vm.channel_path)]
        else:
            paths = [
                os.path.join(self.dir, dirname, CHANNEL_NAME.encode())
                for dirname, part in entries().get(vm.id, ())
                if name_matches(part, vm.name)
            ]
        for path in paths:
            # QEMU creates the socket in this directory: its event wakes us.
            parent = os.path.dirname(path)
            self._watch(parent)
            if self._inotify is not None and parent not in self._watched:
                self._blind = True  # e.g. a live-XML path whose directory is not there yet
            yield path

    def scan(self) -> Entries:
        """channel_path's entries by VM id: (directory name, name part)."""
        found: Entries = {}
        try:
            with os.scandir(self.dir) as it:
                for entry in it:
                    parsed = parse_channel_dir(entry.name)
                    if parsed is not None:
                        found.setdefault(parsed[0], []).append((entry.name, parsed[1]))
        except OSError as err:
            if self._dir_error != err.errno:
                logger.warning(
                    "cannot list channel directory %s: %s", os.fsdecode(self.dir), err.strerror
                )
                self._dir_error = err.errno
            return found
        if self._dir_error is not None:
            logger.info("channel directory %s is readable again", os.fsdecode(self.dir))
            self._dir_error = None
        return found

    def _watch(self, path: bytes) -> None:
        if self._inotify is None or path in self._watched:
            return
        try:
            wd = self._inotify.add_watch(path)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                return  # the full scan / polling still covers it
            # ENOSPC (max_user_watches) and the like: fall back to polling.
            logger.warning(
                "inotify watch on %s failed (%s): polling the channel directory",
                os.fsdecode(path),
                err.strerror,
            )
            self.stop()
            return
        self._watched[path] = wd
        self._watch_paths[wd] = path

    def _on_dir_events(self) -> None:
        if self._inotify is None:
            return
        try:
            events = self._inotify.read_events()
        except OSError as err:
            logger.warning("inotify read failed (%s): polling the channel directory", err)
            self.stop()
            return
        for wd, mask in events:
            if mask & _IN_IGNORED:  # directory removed: the kernel dropped the watch
                path = self._watch_paths.pop(wd, None)
                if path is not None:
                    self._watched.pop(path, None)
            if mask & _IN_Q_OVERFLOW:
                logger.debug("inotify queue overflowed: rescanning channels")
        self._dirty = True
        loop, on_change = self._loop, self._on_change
        if (
            loop is not None
            and on_change is not None
            and loop.time() - self._last_scan >= self._poll
        ):
            on_change()
