"""Reading metrics from a source: the stable disk read, virtio, xenstore, and the cached reader.

``MetricsReader`` is the Pythonic face of libmetrics: it knows where to read
from, re-parses only when the content changed, is safe to share between
threads, and picks this VM's metrics by UUID when the disk holds several VMs.

Why every lookup does a full stable read and compares the bytes, instead of
trusting the header's checksum and length: the checksum is a plain byte sum,
so ordinary value changes keep it (`19` -> `28`, one counter up and another
down), and a reader keyed on it would serve stale metrics forever. The read
is cheap (one O_DIRECT pread of the content); parsing is what costs.
"""

import logging
import os
import re
import threading
import time
from typing import Callable, Iterator, Mapping, NamedTuple, Optional, Tuple, Union

from vhostmd_wire import disk
from vhostmd_wire.disk import DEFAULT_BUSY_TIMEOUT, DEFAULT_RETRY_INTERVAL

from .discovery import find_metrics_disk
from .document import (
    MAX_DISK_DOCUMENT,
    MAX_VIRTIO_DOCUMENT,
    Metric,
    MetricContext,
    MetricsDocument,
    check_document,
    parse_document,
)
from .errors import DiskChecksumError, DiskFormatError, DiskIOError, StrPath
from .freshness import (
    StaleTracker,
    document_age,
    document_host_identity,
    document_is_stale,
)
from .virtio import DEFAULT_PORT, DEFAULT_TIMEOUT, MAX_REPLY, read_virtio_metrics
from .xenstore import read_xenstore_metrics

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BUSY_TIMEOUT",
    "DEFAULT_RETRY_INTERVAL",
    "DiskSource",
    "MetricsReader",
    "Source",
    "VirtioSource",
    "detect_vm_uuid",
    "disk_path",
    "fetch_disk_metrics",
    "fetch_virtio_metrics",
    "fetch_xenstore_metrics",
    "read_disk_content",
]


class _DiskSourceFields(NamedTuple):
    path: Optional[str]
    sys_root: str
    dev_root: str
    busy_timeout: float
    retry_interval: float


class DiskSource(_DiskSourceFields):
    """Read the metrics disk: ``path`` if given, else the device found under sys_root/dev_root."""

    __slots__ = ()

    def __new__(
        cls,
        path: Optional[str] = None,
        sys_root: str = "/sys",
        dev_root: str = "/dev",
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
    ) -> "DiskSource":
        return super().__new__(cls, path, sys_root, dev_root, busy_timeout, retry_interval)


class _VirtioSourceFields(NamedTuple):
    port: str
    timeout: float
    max_reply: int


class VirtioSource(_VirtioSourceFields):
    """Ask the host over the virtio-serial ``port``."""

    __slots__ = ()

    def __new__(
        cls, port: str = DEFAULT_PORT, timeout: float = DEFAULT_TIMEOUT, max_reply: int = MAX_REPLY
    ) -> "VirtioSource":
        return super().__new__(cls, port, timeout, max_reply)


Source = Union[DiskSource, VirtioSource]
_DEFAULT_DISK = DiskSource()
_DEFAULT_VIRTIO = VirtioSource()
Clock = Callable[[], float]
Sleep = Callable[[float], None]


def read_disk_content(
    path: StrPath,
    *,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    retry_interval: float = DEFAULT_RETRY_INTERVAL,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
) -> bytes:
    """The content bytes of the disk at ``path`` after the stable, verified read."""
    return disk.read_disk(
        os.fspath(path),
        busy_timeout=busy_timeout,
        retry_interval=retry_interval,
        clock=clock,
        sleep=sleep,
    )


def disk_path(source: DiskSource) -> str:
    """The disk a DiskSource names: its path, or the discovered device."""
    if source.path is not None:
        return source.path
    return find_metrics_disk(source.sys_root, source.dev_root)


def fetch_disk_metrics(
    source: DiskSource = _DEFAULT_DISK, *, clock: Clock = time.monotonic, sleep: Sleep = time.sleep
) -> Tuple[str, bytes]:
    """(disk path, content bytes) of the disk, checked to be a safe, well-formed document."""
    path = disk_path(source)
    content = read_disk_content(
        path,
        busy_timeout=source.busy_timeout,
        retry_interval=source.retry_interval,
        clock=clock,
        sleep=sleep,
    )
    # Upstream refuses a document libxml cannot parse (garbage, truncated,
    # raw "a<b&c", bytes that are not UTF-8): so do we, with a safe parser.
    check_document(content, source=f"metrics disk {path}", max_size=MAX_DISK_DOCUMENT)
    return path, content


def fetch_virtio_metrics(
    source: VirtioSource = _DEFAULT_VIRTIO, *, clock: Clock = time.monotonic
) -> bytes:
    """The host's reply bytes over the virtio port (``<metrics>...</metrics>\\n\\n``)."""
    return read_virtio_metrics(
        source.port, timeout=source.timeout, max_reply=source.max_reply, clock=clock
    )


def fetch_xenstore_metrics(
    *, env: Optional[Mapping[str, str]] = None, timeout: float = 5.0
) -> bytes:
    """The xenstore metrics as upstream prints them: an XML declaration, then the document."""
    value = read_xenstore_metrics(env=env, timeout=timeout)
    root = check_document(value, source="xenstore metrics", max_size=MAX_VIRTIO_DOCUMENT)
    # Upstream re-serialises with libxml's xmlDocFormatDump: declaration,
    # double-quoted attributes, a final newline.
    return b'<?xml version="1.0"?>\n' + root.tostring() + b"\n"


_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_NIL_UUID = "00000000-0000-0000-0000-000000000000"


def detect_vm_uuid(sys_root: StrPath = "/sys") -> Optional[str]:
    """This VM's UUID: DMI product_uuid (KVM/QEMU), else /sys/hypervisor/uuid (Xen), else None."""
    for rel in (("class", "dmi", "id", "product_uuid"), ("hypervisor", "uuid")):
        path = os.path.join(os.fspath(sys_root), *rel)
        try:
            with open(path, "rb") as f:
                text = f.read(256).decode("ascii", "replace")
        except OSError as err:
            # product_uuid is readable by root only: a normal user falls through.
            log.debug("%s: %s", path, err.strerror)
            continue
        uuid = text.strip().lower()
        if _UUID_RE.match(uuid) and uuid != _NIL_UUID:
            return uuid
        log.debug("%s: not a usable UUID: %r", path, text[:60])
    return None


class MetricsReader:
    """Reads, caches and looks up metrics from one source; thread-safe."""

    def __init__(
        self,
        source: Optional[Source] = None,
        *,
        vm_uuid: Optional[str] = None,
        sys_root: StrPath = "/sys",
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
        wall_clock: Clock = time.time,
    ) -> None:
        self.source: Source = source if source is not None else DiskSource()
        self._given_uuid = vm_uuid.strip().lower() if vm_uuid else None
        self._sys_root = os.fspath(sys_root)
        self._clock = clock
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._tracker = StaleTracker(clock)
        self._identity_seen = False
        self._identity: Optional[str] = None
        self._lock = threading.RLock()
        self._doc: Optional[MetricsDocument] = None
        self._disk: Optional[str] = None
        self._detected: Optional[str] = None
        self._uuid_probed = False
        self.parses = 0  # documents parsed so far (the cache's effect is observable)

    # --- identity -------------------------------------------------------------

    @property
    def vm_uuid(self) -> Optional[str]:
        """The UUID vm lookups use: the caller's, else the one detected from sysfs."""
        if self._given_uuid is not None:
            return self._given_uuid
        with self._lock:
            if not self._uuid_probed:
                self._detected = detect_vm_uuid(self._sys_root)
                self._uuid_probed = True
            return self._detected

    # --- reading --------------------------------------------------------------

    def read(self) -> MetricsDocument:
        """The current document, re-parsed only when the source's content changed."""
        with self._lock:
            if isinstance(self.source, VirtioSource):
                doc = self._read_virtio(self.source)
            else:
                doc = self._read_disk(self.source)
            self._tracker.observe(doc.raw)
            return doc

    # --- freshness and host identity (freshness.py says precisely) --------------

    def age(self) -> float:
        """Seconds from the host's PublicationTime to the guest's wall clock (fresh read).

        FreshnessUnavailableError when the host does not publish PublicationTime.
        """
        with self._lock:
            return document_age(self.read(), self._wall_clock())

    def is_stale(self, factor: float = 2.0) -> bool:
        """True when the age exceeds factor x UpdatePeriod, or this reader has seen the
        same document for longer than that by its monotonic clock (fresh read).

        FreshnessUnavailableError when the host does not publish UpdatePeriod.
        """
        with self._lock:
            doc = self.read()
            return document_is_stale(
                doc, self._wall_clock(), self._tracker.unchanged_for(), factor
            )

    def unchanged_for(self) -> float:
        """Seconds (monotonic) since this reader first saw the bytes of its last read."""
        with self._lock:
            return self._tracker.unchanged_for()

    def host_identity(self) -> Optional[str]:
        """The host's HostIdentity (fresh read), None when the host does not publish one."""
        with self._lock:
            return document_host_identity(self.read())

    def identity_changed(self) -> bool:
        """True when the host identity differs from the one the previous call saw.

        The first call records the identity and returns False; any difference
        counts, also to or from None (moved to a host that does not publish).
        """
        with self._lock:
            current = self.host_identity()
            changed = self._identity_seen and current != self._identity
            self._identity_seen = True
            self._identity = current
            return changed

    def _read_virtio(self, source: VirtioSource) -> MetricsDocument:
        reply = fetch_virtio_metrics(source, clock=self._clock)
        if self._doc is not None and self._doc.raw == reply:
            return self._doc
        doc = parse_document(reply, source=f"virtio port {source.port}", max_size=source.max_reply)
        self._doc = doc
        self.parses += 1
        return doc

    def _read_disk(self, source: DiskSource) -> MetricsDocument:
        if self._disk is None:
            self._disk = disk_path(source)
        path = self._disk
        try:
            content = self._stable_read(source, path)
        except DiskChecksumError:
            raise  # a corrupt disk stays corrupt: looking again would not help
        except (DiskFormatError, DiskIOError):
            if source.path is not None:
                raise
            # The discovered device went away or lost its signature (disk
            # hot-swapped): look again once before giving up.
            self._disk = None
            path = self._disk = disk_path(source)
            content = self._stable_read(source, path)
        if self._doc is not None and self._doc.raw == content:
            return self._doc
        doc = parse_document(content, source=f"metrics disk {path}", max_size=MAX_DISK_DOCUMENT)
        self._doc = doc
        self.parses += 1
        return doc

    def _stable_read(self, source: DiskSource, path: str) -> bytes:
        return read_disk_content(
            path,
            busy_timeout=source.busy_timeout,
            retry_interval=source.retry_interval,
            clock=self._clock,
            sleep=self._sleep,
        )

    # --- lookups --------------------------------------------------------------

    def get(
        self,
        name: str,
        context: Union[MetricContext, str] = MetricContext.HOST,
        *,
        uuid: Optional[str] = None,
        document: Optional[MetricsDocument] = None,
    ) -> Metric:
        """The metric ``name`` in ``context``; in vm context, of this VM (see resolve_vm)."""
        doc = document if document is not None else self.read()
        context = MetricContext.parse(context)
        if context is MetricContext.HOST:
            return doc.get(name, context)
        if uuid is not None:
            return doc.get(name, context, uuid=uuid, strict_uuid=True)
        if self._given_uuid is not None:
            return doc.get(name, context, uuid=self._given_uuid, strict_uuid=True)
        # A detected UUID is a hint: on a one-VM document (a virtio reply)
        # a mismatch (e.g. old SMBIOS byte order) still finds our metrics.
        return doc.get(name, context, uuid=self.vm_uuid, strict_uuid=False)

    def value(
        self, name: str, context: MetricContext = MetricContext.HOST
    ) -> Union[int, float, str]:
        """The typed value of the metric ``name`` in ``context``."""
        return self.get(name, context).value

    def __iter__(self) -> Iterator[Metric]:
        return iter(self.read())
