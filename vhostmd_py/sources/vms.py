"""Running VMs from libvirt, through libvirt-python, surviving libvirt outages.

Upstream (vhostmd.c) opens one connection at start-up and exits when a later
call fails, so a libvirtd restart killed the daemon (SUSE bsc#1098804). It
also logs four lines per cycle while libvirt is unreachable (golden
daemon-cli/bad-uri: 1450 of each in a short run). Here an unreachable libvirt
gives an empty VM list, so host metrics keep being published, the connection
is re-opened on the next cycle, and the outage is logged once when it starts
and once when it ends.

The connection, its liveness checks, the outage lines and the default
error handler are vhostmd_py.libvirt_host's (one Host per daemon, shared with
the built-in sources and the accounting's shaper).

Every method is blocking (libvirt-python is): the daemon calls them from the
Host's worker thread. Without libvirt-python the lister answers [] (said once
by the Host) and the daemon publishes host metrics only.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Tuple

from lxml import etree
from vhostmd_wire.protocol import CHANNEL_NAME

from vhostmd_py.libvirt_host import Host
from vhostmd_py.safexml import safe_parser
from vhostmd_py.sources.vm import VM

log = logging.getLogger(__name__)


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
    """The running domains of one libvirt URI (None = libvirt's default URI).

    HOST: the daemon's shared libvirt boundary; by default one of its own.
    """

    def __init__(self, uri: str | None, *, want_channels: bool = False,
                 host: Host | None = None) -> None:
        self.uri = uri
        self.want_channels = want_channels
        self.last_ok = False  # whether the last list_running() was libvirt's answer
        self._own_host = host is None
        self.host = host if host is not None else Host(uri)
        # (id, uuid) -> channel path: the live XML is fetched once per domain life.
        self._channels: Dict[Tuple[int, str], str | None] = {}

    @property
    def connected(self) -> bool:
        """Whether a connection is currently open."""
        return self.host.connected

    @property
    def available(self) -> bool:
        """Whether libvirt-python can be imported (logs the one line when it cannot)."""
        return self.host.available

    def connection(self) -> Any:
        """The open connection (re-opened after a loss), or None; for built-in sources.

        Blocking, like every method: call it from the same worker thread.
        """
        return self.host.read_only()

    def list_running(self) -> List[VM]:
        """The running domains in libvirt's listing order; [] when libvirt is unreachable.

        last_ok tells the two [] apart (per-VM disks must not retire the disks
        of VMs that merely could not be listed).
        """
        self.last_ok = False
        libvirt = self.host.module()
        if libvirt is None:
            return []
        # One retry: a libvirtd restart between cycles costs nothing when it is back.
        for attempt in (1, 2):
            conn = self.host.read_only()
            if conn is None:
                return []
            try:
                vms = self._list(conn)
                self.last_ok = True
                return vms
            except libvirt.libvirtError as err:
                self.host.drop_read_only()
                if attempt == 2:
                    self.host.outage(self.host.error(err))
                else:
                    log.debug("libvirt call failed, reconnecting: %s", err)
        return []

    def _list(self, conn: Any) -> List[VM]:
        libvirt = self.host.module()
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
        libvirt = self.host.module()
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
        """Forget the channels; close the connection when the Host is this lister's own."""
        if self._own_host:
            self.host.close()
        self._channels.clear()
