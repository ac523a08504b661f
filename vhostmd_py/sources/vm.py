"""A running VM as the sources see it: the one value type every stage takes from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VM:
    """A running domain as libvirt lists it."""

    id: int
    name: str
    uuid: str
    # Path of the org.github.vhostmd.1 socket from the live domain XML,
    # when libvirt told us; None means "discover it in channel_path".
    channel_path: str | None = None
