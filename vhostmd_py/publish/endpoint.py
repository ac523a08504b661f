"""The OpenMetrics endpoint (``<metrics_endpoint>``, vhostmd-py extension, docs/EXTENSIONS.md).

An HTTP server on its own threads (vhostmd_py.publish.bounded_http: the
standard library's server with what a client can make it hold bounded)
serves one collector, :class:`VhostmdCollector`, which on each scrape reads,
without touching the metrics loop:

- the daemon's health (vhostmd_py.publish.health.Health, a locked copy):
  ``vhostmd_cycle_duration_seconds`` (histogram), ``vhostmd_actions_total``,
  ``vhostmd_action_failures_total``, ``vhostmd_action_timeouts_total``,
  ``vhostmd_publish_errors_total``, ``vhostmd_carried_values_total`` (counters),
  ``vhostmd_vms``, ``vhostmd_carried_values_last_cycle``,
  ``vhostmd_virtio_channels_connected``, ``vhostmd_last_publish_timestamp_seconds``
  (gauges);
- every value of the last published Snapshot (``Daemon.last_snapshot``, one
  reference read, so a scrape sees one whole cycle): numeric metrics as
  gauges, string metrics as info metrics (the value in label ``value``),
  named by vhostmd_wire.openmetrics.metric_name (the guest's
  ``vm-dump-metrics --format openmetrics`` uses the same function), values
  scaled to the base unit; VM series carry ``vm_uuid`` and ``vm_id``
  (vhostmd_wire.openmetrics.vm_labels: the guest's labels), and
  ``vhostmd_vm_info`` gives each VM's ``vm_name``.

The values are read back from the Snapshot's rendered XML (the safe lxml
parser) and encoded once per Snapshot and format (:class:`Exposition`):
repeated scrapes of one cycle reuse the bytes. Reading back what was
rendered means the endpoint shows exactly what guests are given, including
the values the history and the alarms add. Label values are escaped by
prometheus_client, so a VM name such as ``a"b<LF>c{x="y"}`` stays one label
value; metric names come from metric_name, which only produces valid names.

That encoding holds the GIL for long (1000 VMs: 0.15 s), so it never runs
beside a cycle: the daemon tells the endpoint when each cycle starts and
ends (:class:`Quiet`; an encoding waits between two chunks while a cycle
runs, at most 2 s after its start), and at each cycle's end the "prepare"
thread (:class:`Preparer`) encodes the new Snapshot's values, and the
answer of the state then, in each format a client asked for within the
last 10 minutes, so a scrape during the next cycle encodes only the health
lines (a few families) and joins cached bytes. A scrape arriving while the
values are prepared waits for them (one lock), and only the newest
Snapshot is prepared when several arrive meanwhile. When encoding takes
longer than the time between two cycles, scrapes wait for it: the cycle
has the GIL first.

prometheus_client's encoders give OpenMetrics text when the client's Accept
header asks for ``application/openmetrics-text``, else the Prometheus text
format.
The socket is bound by :meth:`MetricsEndpoint.start`, called by
process.run before privileges are dropped; :meth:`MetricsEndpoint.close`
stops the server and the prepare thread at shutdown.
"""

from __future__ import annotations

import gzip
import logging
import socket
import threading
import time
from dataclasses import dataclass
from email.message import Message
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Protocol,
    Sequence,
    Tuple,
    Union,
)

from lxml import etree
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from vhostmd_wire.openmetrics import (
    VM_INFO_FAMILY,
    VM_LABELS,
    metric_name,
    value_scale,
)

from vhostmd_py.errors import VhostmdError
from vhostmd_py.logsetup import LIFECYCLE
from vhostmd_py.publish.bounded_http import Answer, BoundedHTTPServer, Limits
from vhostmd_py.safexml import safe_parser

if TYPE_CHECKING:
    from vhostmd_py.config import EndpointConfig
    from vhostmd_py.cycle.snapshot import Snapshot
    from vhostmd_py.publish.health import Health, HealthReading
    from vhostmd_py.sources.vm import VM

log = logging.getLogger(__name__)

NUMERIC_TYPES = frozenset(("int32", "uint32", "int64", "uint64", "real32", "real64"))
# How often the server thread checks for a shutdown request (close() waits this long).
POLL_INTERVAL = 0.1


class EndpointError(VhostmdError):
    """The endpoint cannot be served (its address cannot be bound)."""

    def __init__(self, address: str, port: int, reason: str) -> None:
        self.address = address
        self.port = port
        super().__init__(reason, f"metrics endpoint {address} port {port}: {reason}")


class DaemonView(Protocol):
    """What the collector reads from the daemon (vhostmd_py.daemon.Daemon)."""

    @property
    def health(self) -> Health: ...

    @property
    def last_snapshot(self) -> Snapshot | None: ...

    @property
    def virtio_connections(self) -> int: ...


# --- the collected values ----------------------------------------------------------

Labels = Tuple[str, ...]


@dataclass
class _Family:
    kind: str  # "gauge" or "info"
    help: str
    labels: Tuple[str, ...]
    samples: Dict[Labels, Union[float, str]]


def _vm_labels(vm: VM | None) -> Labels:
    # vhostmd_wire.openmetrics.VM_LABELS' order: the guest's series are the same.
    return () if vm is None else (vm.uuid, str(vm.id))


def snapshot_families(
    snapshot: Snapshot, give_way: Callable[[], None] | None = None
) -> List[Metric]:
    """The Snapshot's values as metric families (gauges and info metrics).

    The first metric wins when two map to the same family name and labels
    (e.g. ``Foo`` and ``foo``), or to one name with different kinds.
    GIVE_WAY is called before each block (the host's, then each VM's): the
    parse is the larger half of an encoding, and this is where it may wait.
    """
    families: Dict[str, _Family] = {}
    # metric_name per (context, name, unit), once per call: every VM has the same
    # few, and naming is most of the parse's cost (1000 VMs: 0.12 of 0.2 s).
    names: Dict[Tuple[str, str, str | None], Tuple[str, str]] = {}
    parser = safe_parser()
    blocks: List[Tuple[VM | None, bytes]] = [(None, snapshot.host)]
    blocks.extend((b.vm, b.xml) for b in snapshot.vms)
    for vm, xml in blocks:
        if give_way is not None:
            give_way()
        if not xml:
            continue
        try:
            root = etree.fromstring(b"<metrics>" + xml + b"</metrics>", parser)
        except etree.XMLSyntaxError as err:  # render guarantees it parses; never fatal
            log.warning("metrics endpoint: unreadable block skipped: %s", err)
            continue
        labels = _vm_labels(vm)
        for elem in root.iter("metric"):
            _add(families, names, elem, vm is not None, labels)
    out: List[Metric] = []
    if snapshot.vms:
        vm_names = InfoMetricFamily(
            VM_INFO_FAMILY, "The VMs of the last cycle: their names (join on vm_uuid, vm_id).",
            labels=VM_LABELS,
        )
        for block in snapshot.vms:
            vm_names.add_metric(list(_vm_labels(block.vm)), {"vm_name": block.vm.name})
        out.append(vm_names)
    for name, fam in families.items():
        family: Union[GaugeMetricFamily, InfoMetricFamily]
        if fam.kind == "gauge":
            family = GaugeMetricFamily(name, fam.help, labels=fam.labels)
            for labels, value in fam.samples.items():
                assert isinstance(value, float)
                family.add_metric(list(labels), value)
        else:
            family = InfoMetricFamily(name, fam.help, labels=fam.labels)
            for labels, value in fam.samples.items():
                family.add_metric(list(labels), {"value": str(value)})
        out.append(family)
    return out


def _add(
    families: Dict[str, _Family],
    names: Dict[Tuple[str, str, str | None], Tuple[str, str]],
    elem: etree._Element,
    in_vm: bool,
    labels: Labels,
) -> None:
    mtype = elem.get("type") or ""
    context = "vm" if in_vm else "host"
    name = elem.findtext("name") or ""
    unit = elem.get("unit")
    text = (elem.findtext("value") or "").strip()
    value: Union[float, str]
    if mtype in NUMERIC_TYPES:
        try:
            value = float(text) * value_scale(unit)
        except ValueError:
            return
        kind = "gauge"
    elif mtype == "string":
        value, kind = text, "info"
    else:
        return
    named = names.get((context, name, unit))
    if named is None:
        unit_note = f" ({unit}, scaled to the base unit)" if unit else ""
        named = names[(context, name, unit)] = (
            metric_name(context, name, unit), f"vhostmd {context} metric {name}{unit_note}"
        )
    fname, help_text = named
    fam = families.get(fname)
    if fam is None:
        fam = families[fname] = _Family(kind, help_text, VM_LABELS if in_vm else (), {})
    if fam.kind != kind or fam.labels != (VM_LABELS if in_vm else ()):
        return
    fam.samples.setdefault(labels, value)


# --- the collector -------------------------------------------------------------------


class VhostmdCollector:
    """prometheus_client collector: the daemon's health and its last Snapshot's values."""

    def __init__(self, daemon: DaemonView) -> None:
        self._daemon = daemon
        self._lock = threading.Lock()  # scrapes run on concurrent request threads
        self._cached: Tuple[Snapshot | None, List[Metric]] = (None, [])

    def state(self) -> Tuple[HealthReading, int, Snapshot | None]:
        """What a scrape shows, without encoding it: equal states give equal bytes."""
        daemon = self._daemon
        return daemon.health.read(), daemon.virtio_connections, daemon.last_snapshot

    def describe(self) -> List[Metric]:
        """Nothing up front: the names depend on the config (no registry-wide checks)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The families of one scrape."""
        yield from self.health_families()
        yield from self.value_families()[1]

    def value_families(self) -> Tuple[Snapshot | None, List[Metric]]:
        """(the last Snapshot, its value families), parsed once per Snapshot."""
        snapshot = self._daemon.last_snapshot  # one reference: one whole cycle
        if snapshot is None:
            return None, []
        return snapshot, self.families_of(snapshot)

    def families_of(
        self, snapshot: Snapshot, give_way: Callable[[], None] | None = None
    ) -> List[Metric]:
        """SNAPSHOT's value families, parsed once per Snapshot (GIVE_WAY: snapshot_families')."""
        with self._lock:
            cached_for, families = self._cached
            if cached_for is not snapshot:
                families = snapshot_families(snapshot, give_way)
                self._cached = (snapshot, families)
        return families

    def health_families(self) -> Iterator[Metric]:
        """The daemon's health, read now."""
        reading = self._daemon.health.read()
        health = self._daemon.health
        cumulative: List[Tuple[str, float]] = []
        total = 0
        for bound, count in zip(health.buckets, reading.cycle_bucket_counts):
            total += count
            cumulative.append((_le(bound), total))
        cumulative.append(("+Inf", reading.cycles))
        yield HistogramMetricFamily(
            "vhostmd_cycle_duration_seconds",
            "Duration of the daemon's metrics cycles (collect and publish).",
            buckets=cumulative,
            sum_value=reading.cycle_seconds_sum,
        )
        yield CounterMetricFamily(
            "vhostmd_actions", "Metric actions started.", value=reading.actions
        )
        yield CounterMetricFamily(
            "vhostmd_action_failures",
            "Metric actions whose value could not be used (failed, timed out, killed).",
            value=reading.action_failures,
        )
        yield CounterMetricFamily(
            "vhostmd_action_timeouts", "Metric actions killed at their timeout.",
            value=reading.action_timeouts,
        )
        yield CounterMetricFamily(
            "vhostmd_publish_errors", "Failed publishes to the metrics disk.",
            value=reading.publish_errors,
        )
        yield GaugeMetricFamily("vhostmd_vms", "VMs seen in the last cycle.", value=reading.vms)
        yield CounterMetricFamily(
            "vhostmd_carried_values",
            "Metric values published from an earlier cycle because their source was still "
            "being read at the deadline.",
            value=reading.carried_values,
        )
        yield GaugeMetricFamily(
            "vhostmd_carried_values_last_cycle",
            "Metric values the last cycle published from an earlier cycle.",
            value=reading.carried_now,
        )
        yield GaugeMetricFamily(
            "vhostmd_virtio_channels_connected", "virtio-serial channels connected.",
            value=self._daemon.virtio_connections,
        )
        if reading.last_publish is not None:
            yield GaugeMetricFamily(
                "vhostmd_last_publish_timestamp_seconds",
                "Wall-clock time of the last successful publish.",
                value=reading.last_publish,
            )


def _le(bound: float) -> str:
    return repr(float(bound))


# --- the HTTP server ------------------------------------------------------------------


def make_registry(daemon: DaemonView) -> CollectorRegistry:
    """A private registry (not prometheus_client's global one) with our one collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VhostmdCollector(daemon))
    return registry


class _Families:
    """A registry-like collector over fixed families (prometheus_client encoders take one)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


_EOF = b"# EOF\n"

Encoder = Callable[[Any], bytes]


def encode_families(
    encoder: Encoder, families: Sequence[Metric], give_way: Callable[[], None] | None = None
) -> bytes:
    """ENCODER's bytes for FAMILIES, one family at a time (GIVE_WAY before each).

    The same bytes as ENCODER over all of them at once: both of
    prometheus_client's formats are each family's lines in turn, then a
    trailer (OpenMetrics' ``# EOF``, nothing for the text format).
    """
    trailer = encoder(_Families(()))
    chunks = []
    for family in families:
        if give_way is not None:
            give_way()
        chunk = encoder(_Families((family,)))
        chunks.append(chunk[: len(chunk) - len(trailer)])
    chunks.append(trailer)
    return b"".join(chunks)


class _Closed(Exception):
    """The endpoint closed while an encoding waited or ran: it is dropped."""


class Quiet:
    """Whether a metrics cycle runs: value encodings wait for its end (a bounded time).

    Encoding the values holds the GIL for long (1000 VMs: 0.15 s of Python),
    and the cycle's libvirt worker gives the GIL back on every libvirt call
    and waits for it each time, so an encoding beside a cycle's reads starves
    them (bench/README.md, OpenMetrics endpoint under abuse). The daemon says
    when each cycle starts and ends; an encoding checks between two chunks
    (a VM's block, a family) and waits while a cycle runs, for at most
    ``pause_limit`` seconds after that cycle started: the reads are a
    cycle's first part (0.05 s with 1000 VMs), and a cycle still running
    past that waits for actions or a hung libvirt call, which hold no GIL,
    while a scrape waiting for it would time out.
    """

    def __init__(self, pause_limit: float = 2.0, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.pause_limit = pause_limit
        self._clock = clock
        self._between = threading.Event()
        self._between.set()
        self._started = 0.0
        self.closed = False

    def cycle_started(self) -> None:
        if self.closed:  # nothing waits once the endpoint closed
            return
        self._started = self._clock()
        self._between.clear()

    def cycle_ended(self) -> None:
        self._between.set()

    def close(self) -> None:
        """Waiting encodings go on at once; preparations stop (scrapes are still answered)."""
        self.closed = True
        self._between.set()

    def give_way(self, *, abandon: bool = False) -> Callable[[], None]:
        """The pause of one encoding: returns at once between cycles, waits during one.

        ABANDON: raise _Closed once the endpoint closes (a preparation's; a
        scrape is still answered).
        """

        def give_way() -> None:
            if abandon and self.closed:
                raise _Closed()
            if self._between.is_set():
                return
            left = self._started + self.pause_limit - self._clock()
            if left > 0:
                self._between.wait(left)
            if abandon and self.closed:
                raise _Closed()

        return give_way


# A format (content type and gzip) is prepared after each cycle while a client
# asked for it within this many seconds (Prometheus' default interval is 15 s,
# 1 min is common); an endpoint nobody scrapes costs no encoding.
RECENT = 600.0


class Exposition:
    """The scrape's bytes: health encoded per scrape, values encoded once per Snapshot and format.

    Encoding 1000 VMs' values costs about as much as parsing them (0.1 s of
    the GIL, shared with the metrics loop); a scraper polling faster than the
    update period gets the same bytes again for the price of the health lines.
    :meth:`prepare` does that encoding after each cycle, for the formats
    clients asked for recently, so that a scrape during the next cycle finds
    the values' bytes ready; every value encoding (prepared or on a scrape's
    demand) waits while a cycle runs (:class:`Quiet`).
    """

    def __init__(
        self,
        collector: VhostmdCollector,
        *,
        quiet: Quiet | None = None,
        recent: float = RECENT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._collector = collector
        self._quiet = quiet
        self._recent = recent
        self._clock = clock
        self._cache: Dict[str, Tuple[Snapshot, bytes]] = {}  # content type -> (for, bytes)
        # One scrape (or preparation) is encoded at a time, whatever the number of
        # connections: the endpoint then competes with the metrics loop for the
        # GIL with one thread, never sixteen, and a scrape arriving while the
        # values are prepared waits for them instead of encoding them again.
        # Sending happens outside it (a slow reader holds its connection, not this lock).
        self._work = threading.Lock()
        # The last answer per (content type, gzip), reused while the state it shows
        # is unchanged (it changes a few times a cycle): a scraper polling back to
        # back costs a request parse and a lookup, not an encoding. At most four.
        self._answers: Dict[Tuple[str, bool], Tuple[Tuple[Any, ...], bytes]] = {}
        # When each (content type, gzip) was last asked for, and its encoder.
        self._asked: Dict[Tuple[str, bool], Tuple[float, Encoder]] = {}
        self.preparations = 0  # value encodings done by prepare() (tests, the bench)

    def render(self, accept: str | None) -> Tuple[bytes, str]:
        """(body, content type) for a client sending ACCEPT."""
        encoder, content_type = choose_encoder(accept or "")
        with self._work:
            snapshot = self._collector.state()[2]
            return self._body(encoder, content_type, snapshot, self._give_way()), content_type

    def app(self, request_headers: Message) -> Answer:
        """GET or HEAD of any path: the exposition, gzip when accepted (as prometheus_client)."""
        accept = request_headers.get("Accept")
        gz = gzip_accepted(request_headers.get("Accept-Encoding") or "")
        encoder, content_type = choose_encoder(accept or "")
        with self._work:
            self._asked[(content_type, gz)] = (self._clock(), encoder)
            body = self._answer(encoder, content_type, gz, self._give_way())
        headers = [("Content-Type", content_type)]
        if gz:
            headers.append(("Content-Encoding", "gzip"))
        return 200, headers, body

    def prepare(self, snapshot: Snapshot) -> bool:
        """Encode SNAPSHOT's values, and the answer of the state now, in each recent format.

        False when nothing was prepared: no format was asked for recently, or
        SNAPSHOT is no longer the last one (a newer one is prepared instead).
        Raises _Closed when the endpoint closes meanwhile.
        """
        now = self._clock()
        with self._work:
            recent = [(key, encoder) for key, (when, encoder) in self._asked.items()
                      if now - when <= self._recent]
        if not recent:
            return False
        give_way = self._give_way(abandon=True)  # one pause budget for the whole preparation
        for (content_type, gz), encoder in recent:
            with self._work:  # a scrape may come in between two formats
                if self._collector.state()[2] is not snapshot:
                    return False
                if not self._cached(content_type, snapshot):
                    self.preparations += 1
                self._answer(encoder, content_type, gz, give_way)
        return True

    def _give_way(self, *, abandon: bool = False) -> Callable[[], None] | None:
        return self._quiet.give_way(abandon=abandon) if self._quiet is not None else None

    def _answer(
        self, encoder: Encoder, content_type: str, gz: bool, give_way: Callable[[], None] | None
    ) -> bytes:
        """The answer for the state now, reused while it is unchanged (under _work)."""
        state = self._collector.state()
        cached = self._answers.get((content_type, gz))
        if cached is not None and _same_state(cached[0], state):
            return cached[1]
        body = self._body(encoder, content_type, state[2], give_way)
        if gz:
            # zlib gives the GIL back while it compresses (1000 VMs: 536 kB, 5 ms).
            body = gzip.compress(body, compresslevel=1)
        self._answers[(content_type, gz)] = (state, body)
        return body

    def _body(
        self,
        encoder: Encoder,
        content_type: str,
        snapshot: Snapshot | None,
        give_way: Callable[[], None] | None,
    ) -> bytes:
        health = encoder(_Families(self._collector.health_families()))
        if snapshot is None:
            return health
        values = self._values(encoder, content_type, snapshot, give_way)
        if health.endswith(_EOF):  # OpenMetrics: one # EOF, at the very end
            health = health[: -len(_EOF)]
        return health + values

    def _cached(self, content_type: str, snapshot: Snapshot) -> bool:
        cached = self._cache.get(content_type)
        return cached is not None and cached[0] is snapshot

    def _values(
        self,
        encoder: Encoder,
        content_type: str,
        snapshot: Snapshot,
        give_way: Callable[[], None] | None,
    ) -> bytes:
        """SNAPSHOT's values in the format, encoded once per Snapshot (under _work)."""
        cached = self._cache.get(content_type)
        if cached is not None and cached[0] is snapshot:
            return cached[1]
        families = self._collector.families_of(snapshot, give_way)
        values = encode_families(encoder, families, give_way)
        self._cache[content_type] = (snapshot, values)
        return values


def _same_state(a: Tuple[Any, ...], b: Tuple[Any, ...]) -> bool:
    """Same health reading and channel count, the very same Snapshot object."""
    return a[0] == b[0] and a[1] == b[1] and a[2] is b[2]


class Preparer:
    """The endpoint's "prepare" thread: each published Snapshot's values, encoded ahead.

    :meth:`notify` (the daemon, after each cycle) hands over the newest
    Snapshot and returns at once; the thread runs Exposition.prepare on it in
    the idle time before the next cycle (Quiet holds it during one). One
    Snapshot is pending at most: one that arrives while another is prepared
    replaces the pending one, so only the newest is prepared next.
    """

    def __init__(self, exposition: Exposition, quiet: Quiet) -> None:
        self._exposition = exposition
        self._quiet = quiet
        self._cond = threading.Condition()
        self._pending: Snapshot | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.prepared = 0  # Snapshots for which prepare() encoded something
        self.idle = threading.Event()  # nothing pending or being prepared (tests)
        self.idle.set()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="vhostmd-endpoint-prepare", daemon=True
        )
        self._thread.start()

    def notify(self, snapshot: Snapshot) -> None:
        """SNAPSHOT is the newest one: prepare it next (instead of any still pending)."""
        with self._cond:
            self._pending = snapshot
            self.idle.clear()
            self._cond.notify()

    def close(self, timeout: float = 1.0) -> None:
        """Stop the thread (a preparation in progress is dropped) and join it."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._quiet.close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self.idle.set()
                    self._cond.wait()
                snapshot = self._pending
                if self._closed or snapshot is None:
                    self.idle.set()
                    return
                self._pending = None
            try:
                if self._exposition.prepare(snapshot):
                    self.prepared += 1
            except _Closed:
                self.idle.set()
                return
            except Exception:  # a bug must not end the preparations: scrapes encode then
                log.exception("metrics endpoint: preparing the values failed")


class MetricsEndpoint:
    """The HTTP server of one registry at ADDRESS:PORT (port 0: any free port)."""

    def __init__(
        self, address: str, port: int, collector: VhostmdCollector, *, limits: Limits | None = None
    ) -> None:
        self.address = address
        self.port = port
        self.limits = limits or Limits()
        self._quiet = Quiet()
        self._exposition = Exposition(collector, quiet=self._quiet)
        self._preparer = Preparer(self._exposition, self._quiet)
        self._server: BoundedHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def for_config(cls, config: EndpointConfig, daemon: DaemonView) -> MetricsEndpoint:
        """The endpoint <metrics_endpoint> asks for, serving DAEMON's metrics."""
        return cls(config.address, config.port, VhostmdCollector(daemon))

    def start(self) -> None:
        """Bind (before privileges are dropped) and serve on daemon threads."""
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        try:
            server = BoundedHTTPServer(
                (self.address, self.port), self._exposition.app, limits=self.limits, family=family
            )
        except OSError as err:
            raise EndpointError(self.address, self.port, err.strerror or str(err)) from err
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, args=(POLL_INTERVAL,), name="vhostmd-endpoint",
            daemon=True,
        )
        self._thread.start()
        self._preparer.start()
        host = f"[{self.address}]" if family == socket.AF_INET6 else self.address
        # Shown at the default level: with port 0 this is where the port is said.
        logging.getLogger(LIFECYCLE).info(
            "serving OpenMetrics on http://%s:%d/metrics", host, self.port
        )

    def cycle_started(self) -> None:
        """The daemon starts a cycle: value encodings wait until it ends (Quiet)."""
        self._quiet.cycle_started()

    def cycle_ended(self, snapshot: Snapshot | None) -> None:
        """The cycle ended (SNAPSHOT: the one it published, None: stopped); prepare it."""
        self._quiet.cycle_ended()
        if snapshot is not None and self._server is not None:
            self._preparer.notify(snapshot)

    def close(self) -> None:
        """Stop serving and close the socket (requests in progress finish on their own)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._preparer.close()
        server.shutdown()  # returns once serve_forever has left its loop
        server.server_close()
        if self._thread is not None:
            self._thread.join(1.0)
            self._thread = None


__all__: Sequence[str] = (
    "DaemonView",
    "EndpointError",
    "Exposition",
    "MetricsEndpoint",
    "Preparer",
    "Quiet",
    "VhostmdCollector",
    "make_registry",
    "snapshot_families",
)
