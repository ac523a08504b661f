"""Freshness and identity host metrics (vhostmd-py extension; <freshness/>).

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
from typing import Any, Callable, Tuple

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
from vhostmd_py.cycle.render import ExtraMetric, append_metrics
from vhostmd_py.cycle.snapshot import Snapshot
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
    """The three host metrics of one daemon configuration; a cycle step of the daemon.

    As a step (vhostmd_py.assemble.Step) it reads no statistics and adds its
    metrics to the host part through render.append_metrics, after the other
    steps, so every transport publishes them.
    """

    reads_stats = False

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
        tail = [ExtraMetric(FRESHNESS_PERIOD, FRESHNESS_PERIOD_TYPE, FRESHNESS_UNIT,
                            str(update_period))]
        if self.identity is not None:
            tail.append(ExtraMetric(HOST_IDENTITY, HOST_IDENTITY_TYPE, None, self.identity))
        self._tail = tuple(tail)

    def metrics(self) -> Tuple[ExtraMetric, ...]:
        """The metrics, PublicationTime now."""
        now = format_publication_time(self._wall())
        return (ExtraMetric(FRESHNESS_TIME, FRESHNESS_TIME_TYPE, FRESHNESS_UNIT, now),
                *self._tail)

    def render(self) -> bytes:
        """The metrics' elements, PublicationTime now."""
        return append_metrics(Snapshot(b"", ()), self.metrics(), {}).host

    # --- a cycle step ---------------------------------------------------------------

    async def observe(self, stats: object) -> None:
        """Nothing to observe: the values are the clock's and the identity's."""

    def decorate(self, snapshot: Snapshot) -> Snapshot:
        """SNAPSHOT with the metrics appended to its host part."""
        return append_metrics(snapshot, self.metrics(), {})

    def reconfigure(self, config: Any) -> bool:
        """Whether CONFIG asks for these very metrics (else: built anew, identity re-read)."""
        return bool(config.freshness == self.config
                    and config.update_period == self.update_period)

    def close(self) -> None:
        """Nothing held."""
