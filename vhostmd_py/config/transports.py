"""``<transport>`` (vbd, virtio) and ``<virtio>`` (the virtio-serial channels)."""

from __future__ import annotations

import logging
from typing import List, Tuple

from lxml import etree

from vhostmd_py.config.document import line_of, text_of
from vhostmd_py.config.records import VirtioConfig
from vhostmd_py.config.units import EXPIRATION_TIME_RANGE, MAX_CHANNELS_RANGE, integer_in
from vhostmd_py.errors import ConfigError

log = logging.getLogger(__name__)

# libvirt creates auto-path channel sockets here
# (.../channel/target/domain-<ID>-<NAME>/org.github.vhostmd.1).
DEFAULT_CHANNEL_PATH = "/var/lib/libvirt/qemu/channel/target"
DEFAULT_MAX_CHANNELS = 1024
DEFAULT_EXPIRATION_TIME = 15

TRANSPORTS = ("vbd", "virtio")


def parse_transports(globals_: etree._Element, file: str) -> Tuple[str, ...]:
    """The ``<transport>`` names, each once, in order (``vbd`` when none is given)."""
    found: List[str] = []
    for elem in globals_.findall("transport"):
        name = text_of(elem)
        if name == "xenstore":
            # This build has no xenstore writer, like upstream built
            # --without-xenstore (daemon-cli/xenstore.stderr).
            raise ConfigError(
                file, "No support for xenstore transport in this vhostmd", line_of(elem)
            )
        if name not in TRANSPORTS:
            raise ConfigError(
                file,
                f"Unknown transport '{name}' (supported: {', '.join(TRANSPORTS)})",
                line_of(elem),
            )
        if name not in found:
            found.append(name)
    return tuple(found) or ("vbd",)


def parse_virtio(globals_: etree._Element, file: str, update_period: int) -> VirtioConfig:
    """``<virtio>`` with its defaults (also when absent), expiration raised as upstream does."""
    elems = globals_.findall("virtio")
    if len(elems) > 1:
        log.warning(
            "%s:%s: more than one <virtio> element; using the first",
            file,
            line_of(elems[1]),
        )
    channel_path = DEFAULT_CHANNEL_PATH
    max_channels = DEFAULT_MAX_CHANNELS
    expiration = DEFAULT_EXPIRATION_TIME
    if elems:
        virtio = elems[0]
        cp = virtio.find("channel_path")
        if cp is not None and text_of(cp):
            channel_path = text_of(cp)
        mc = virtio.find("max_channels")
        if mc is not None:
            max_channels = integer_in(
                text_of(mc), file, "max_channels", line_of(mc), MAX_CHANNELS_RANGE, "",
                "max_channels",
            )
        et = virtio.find("expiration_time")
        if et is not None:
            expiration = integer_in(
                text_of(et), file, "expiration_time", line_of(et), EXPIRATION_TIME_RANGE,
                " seconds", "expiration_time",
            )
    # Upstream raises it so a channel never expires between two updates
    # (tests/data/golden/upstream/FACTS.md, virtio transport: effective
    # expiration = max(expiration_time, 3 x period)).
    expiration = max(expiration, 3 * update_period)
    return VirtioConfig(channel_path, max_channels, expiration)
