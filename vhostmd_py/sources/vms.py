"""Running VMs from libvirt, through libvirt-python, surviving libvirt outages.

Upstream (vhostmd.c) opens one connection at start-up and exits when a later
call fails, so a libvirtd restart killed the daemon (SUSE bsc#1098804). It
also logs four lines per cycle while libvirt is unreachable (golden
daemon-cli/bad-uri: 1450 of each in a short run). Here an unreachable libvirt
gives an empty VM list, so host metrics keep being published, the connection
is re-opened on the next cycle, and the outage is logged once when it starts
and once when it ends.

Liveness is checked with isAlive() before each use and any failed call drops
the connection; registerCloseCallback is not used because it only fires with a
libvirt event loop implementation running, which we do not run. The
connection is read-only: listing and XMLDesc(0) need nothing more, and it also
works after -u USER against a polkit-protected libvirtd.

Note: with a file-backed test driver URI that does not exist, libxml2 itself
(not libvirt's error reporting, which we silence) prints an "I/O warning" line
on stderr at every re-connection attempt; real drivers do not.

Every method is blocking (libvirt-python is): the daemon calls them from one
worker thread. `libvirt` is imported lazily so that guests, which install
without libvirt-python, can import the package. A host installed without the
`[host]` extra has no libvirt-python either: that is said once, in one line
with the way to install it, and the daemon publishes host metrics only
(it used to log a 15-line ImportError traceback every cycle).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Dict, List, Tuple

from lxml import etree
from vhostmd_wire.protocol import CHANNEL_NAME

from vhostmd_py.cycle.snapshot import VM
from vhostmd_py.safexml import safe_parser

log = logging.getLogger(__name__)

MISSING_LIBVIRT = (
    "libvirt-python is not installed (%s): VM metrics and the virtio transport are off, "
    "publishing host metrics only; install it with pip install 'vhostmd-py[host]' "
    "or your distribution's python3-libvirt"
)

_handler_lock = threading.Lock()
_handler_installed = False


def _silence_default_handler(libvirt: Any) -> None:
    """Stop libvirt printing "libvirt: ... error : ..." on stderr; we log instead."""
    global _handler_installed
    with _handler_lock:
        if not _handler_installed:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _handler_installed = True


def channel_path_from_xml(xml: str) -> str | None:
    """The UNIX socket path of the org.github.vhostmd.1 channel in a domain XML, if any."""
    try:
        root = etree.fromstring(xml.encode("utf-8"), safe_parser())
    except etree.XMLSyntaxError:
        return None
    for channel in root.iterfind("devices/channel"):
        target = channel.find("target")
        source = channel.find("source")
        if target is None or source is None or target.get("name") != CHANNEL_NAME:
            continue
        path = source.get("path")
        if path:
            return path
    return None


class LibvirtVMs:
    """The running domains of one libvirt URI (None = libvirt's default URI)."""

    def __init__(self, uri: str | None, *, want_channels: bool = False) -> None:
        self.uri = uri
        self.want_channels = want_channels
        self.last_ok = False  # whether the last list_running() was libvirt's answer
        self._libvirt: Any = None
        self._conn: Any = None
        self._down = False
        # Set when `import libvirt` failed: said once, never retried (a package
        # installed into a running interpreter's path needs a restart anyway).
        self._missing: str | None = None
        # (id, uuid) -> channel path: the live XML is fetched once per domain life.
        self._channels: Dict[Tuple[int, str], str | None] = {}

    @property
    def connected(self) -> bool:
        """Whether a connection is currently open."""
        return self._conn is not None

    @property
    def available(self) -> bool:
        """Whether libvirt-python can be imported (logs the one line when it cannot)."""
        return self._module() is not None

    def _module(self) -> Any:
        """The libvirt module, or None when libvirt-python is missing (logged once)."""
        if self._libvirt is None and self._missing is None:
            try:
                import libvirt
            except ImportError as err:
                self._missing = str(err)
                log.warning(MISSING_LIBVIRT, err)
                return None
            _silence_default_handler(libvirt)
            self._libvirt = libvirt
        return self._libvirt

    def _describe(self) -> str:
        return self.uri if self.uri is not None else "(default URI)"

    def _open(self) -> Any:
        """An open connection, re-opened after a loss; None (logged once) when impossible."""
        libvirt = self._module()
        if libvirt is None:
            return None
        if self._conn is not None:
            try:
                if self._conn.isAlive():
                    return self._conn
            except libvirt.libvirtError:
                pass
            self._drop()
        try:
            # Read-only is all we need (listing, XML); it also works as non-root
            # against a polkit-protected libvirtd after -u USER.
            self._conn = libvirt.openReadOnly(self.uri)
        except libvirt.libvirtError as err:
            self._outage(err)
            return None
        if self._down:
            log.info("libvirt connection to %s restored", self._describe())
            self._down = False
        return self._conn

    def _outage(self, err: Exception) -> None:
        if not self._down:
            log.error("Unable to open libvirt connection to %s: %s", self._describe(), err)
            self._down = True
        else:
            log.debug("libvirt still unreachable at %s: %s", self._describe(), err)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as err:  # closing a dead connection may fail; nothing to do
                log.debug("closing libvirt connection: %s", err)

    def connection(self) -> Any:
        """The open connection (re-opened after a loss), or None; for built-in sources.

        Blocking, like every method: call it from the same worker thread.
        """
        return self._open()

    def list_running(self) -> List[VM]:
        """The running domains in libvirt's listing order; [] when libvirt is unreachable.

        last_ok tells the two [] apart (per-VM disks must not retire the disks
        of VMs that merely could not be listed).
        """
        self.last_ok = False
        libvirt = self._module()
        if libvirt is None:
            return []
        # One retry: a libvirtd restart between cycles costs nothing when it is back.
        for attempt in (1, 2):
            conn = self._open()
            if conn is None:
                return []
            try:
                vms = self._list(conn)
                self.last_ok = True
                return vms
            except libvirt.libvirtError as err:
                self._drop()
                if attempt == 2:
                    self._outage(err)
                else:
                    log.debug("libvirt call failed, reconnecting: %s", err)
        return []

    def _list(self, conn: Any) -> List[VM]:
        libvirt = self._module()
        # Upstream lists with virConnectListDomains (ids, in the driver's order);
        # the document keeps that order. listAllDomains then gives name and
        # UUID in one call instead of three per domain.
        ids = conn.listDomainsID()
        domains = {d.ID(): d for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
        vms: List[VM] = []
        seen = set()
        for dom_id in ids:
            dom = domains.get(dom_id)
            if dom is None:
                continue  # stopped between the two calls: skipped, as upstream does
            name = dom.name()
            uuid = dom.UUIDString()
            key = (dom_id, uuid)
            seen.add(key)
            channel = self._channel_of(dom, key) if self.want_channels else None
            vms.append(VM(id=dom_id, name=name, uuid=uuid, channel_path=channel))
        for gone in set(self._channels) - seen:
            del self._channels[gone]
        return vms

    def _channel_of(self, dom: Any, key: Tuple[int, str]) -> str | None:
        if key in self._channels:
            return self._channels[key]
        libvirt = self._module()
        try:
            path = channel_path_from_xml(dom.XMLDesc(0))
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                # One domain's XML must not cost every VM its metrics: no
                # channel path for it this cycle (discovery may still find it).
                log.warning("cannot read the XML of domain %s: %s", key[0], err)
            return None  # not cached: asked again next cycle
        self._channels[key] = path
        return path

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._drop()
        self._channels.clear()
