"""Freshness and identity host metrics (vhostmd-py extension, issue 15; <freshness/>).

Three host metrics, rendered at publication into the host part of every
document (the shared disk, the per-VM disks, the virtio replies), named in
vhostmd_wire.protocol so the guest reads the same names:

- PublicationTime (real64, s): epoch seconds, 3 decimals, when the document
  was rendered; a guest compares it with its clock to see a stalled host;
- UpdatePeriod (uint32, s): how often a new document comes;
- HostIdentity (string): HMAC-SHA256(key, host id) as 32 lowercase hex
  digits. It changes when the VM lands on another host, and tells the guest
  nothing about the host (not its name, not its machine-id): without the
  key, which never leaves the host (0600), the hash cannot be linked to
  anything. The host id is /etc/machine-id, or a random id stored beside the
  key when there is none.

Every OS boundary is a parameter (key path, machine-id path, clock, random).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from typing import Callable

from vhostmd_wire.protocol import (
    FRESHNESS_PERIOD,
    FRESHNESS_PERIOD_TYPE,
    FRESHNESS_TIME,
    FRESHNESS_TIME_TYPE,
    FRESHNESS_UNIT,
    HOST_IDENTITY,
    HOST_IDENTITY_TYPE,
    format_publication_time,
)

from vhostmd_py.config import FreshnessConfig
from vhostmd_py.cycle.render import render_metric
from vhostmd_py.errors import IdentityError
from vhostmd_py.fs import create_once, read_small

KEY_BYTES = 32
IDENTITY_HEX = 32
# The random host id written beside the key when the host has no machine-id.
HOST_ID_NAME = "host-id"


def read_or_create(path: str, make: Callable[[], bytes]) -> bytes:
    """PATH's content; when missing, MAKE's bytes written there atomically with mode 0600
    (vhostmd_py.fs.create_once: never overwriting, a second daemon's value wins)."""
    return create_once(path, make, IdentityError, mode=0o600)


def host_identity(config: FreshnessConfig, *,
                  random: Callable[[int], bytes] = os.urandom) -> str | None:
    """The host identity (32 lowercase hex), None when identity="no"."""
    if config.identity_key is None:
        return None
    key = read_or_create(config.identity_key, lambda: random(KEY_BYTES))
    if len(key) < 16:
        raise IdentityError(config.identity_key, f"key of {len(key)} bytes is too short "
                            "(at least 16; delete it to get a new random one)")
    host_id = (read_small(config.machine_id, IdentityError) or b"").strip()
    if not host_id:
        # No machine-id (containers, minimal hosts): a random one of our own.
        beside = os.path.join(os.path.dirname(config.identity_key), HOST_ID_NAME)
        host_id = read_or_create(beside, lambda: random(16).hex().encode() + b"\n").strip()
    return hmac.new(key, host_id, hashlib.sha256).hexdigest()[:IDENTITY_HEX]


class Freshness:
    """The three host metrics of one daemon configuration."""

    def __init__(self, config: FreshnessConfig, update_period: int, *,
                 wall: Callable[[], float] = time.time,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        self.config = config
        self.update_period = update_period
        self._wall = wall
        # Computed once (at start-up and reload, before -u drops root): the
        # key and machine-id may not be readable afterwards.
        self.identity = host_identity(config, random=random)
        # The contract with the guest library is vhostmd_wire.protocol's.
        tail = render_metric(
            FRESHNESS_PERIOD_TYPE, FRESHNESS_PERIOD, str(update_period).encode(), None,
            FRESHNESS_UNIT,
        )
        if self.identity is not None:
            tail += render_metric(
                HOST_IDENTITY_TYPE, HOST_IDENTITY, self.identity.encode(), None, None
            )
        self._tail = tail

    def render(self) -> bytes:
        """The metrics' elements, PublicationTime now."""
        now = format_publication_time(self._wall()).encode()
        head = render_metric(FRESHNESS_TIME_TYPE, FRESHNESS_TIME, now, None, FRESHNESS_UNIT)
        return head + self._tail
