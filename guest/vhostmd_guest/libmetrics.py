"""The libmetrics API in Python: upstream's function names, typed results, none of its bugs.

Upstream (libmetrics.h) exposes ``get_metric(name, &metric, context)``, the
``get_{host,vm}_{cpu,memory}_metrics`` record fillers and the ``dump_*``
functions. Here ``get_metric(name, context)`` returns a Metric whose
``.value`` is typed, the fillers return frozen records, and every failure
is a typed vhostmd_guest error. Deliberately NOT copied (docs/COMPATIBILITY.md, Guest):
- the first get_metric of a process fails (upstream compares the disk's
  checksum with an initial 0 and never reads the disk);
- vm lookups fail once the disk holds two VMs (ours picks this VM by UUID);
- get_vm_memory_metrics/get_vm_cpu_metrics fill fields from the wrong
  metrics and read the real64 CPU time through the uint32 union member.

The module-level functions share one MetricsReader (created on first use,
reading the auto-discovered disk); ``set_default_reader`` points them
elsewhere (a disk path, virtio, a given VM UUID).
"""

import os
import sys
import threading
from typing import Dict, NamedTuple, Optional, Union

from .document import Metric, MetricContext, MetricsDocument, MetricType
from .errors import DestinationError, MetricNotFoundError, MetricValueError, StrPath
from .reader import (
    DiskSource,
    MetricsReader,
    VirtioSource,
    fetch_disk_metrics,
    fetch_virtio_metrics,
    fetch_xenstore_metrics,
)

__all__ = [
    "METRIC_CONTEXT_HOST",
    "METRIC_CONTEXT_VM",
    "M_INT32",
    "M_INT64",
    "M_REAL32",
    "M_REAL64",
    "M_STRING",
    "M_UINT32",
    "M_UINT64",
    "CpuMetrics",
    "HostCpuMetrics",
    "HostMemoryMetrics",
    "MemoryMetrics",
    "Metric",
    "MetricContext",
    "MetricType",
    "VmCpuMetrics",
    "VmMemoryMetrics",
    "default_reader",
    "dump_metrics",
    "dump_virtio_metrics",
    "dump_xenstore_metrics",
    "get_host_cpu_metrics",
    "get_host_identity",
    "get_host_memory_metrics",
    "get_metric",
    "get_metrics_age",
    "get_vm_cpu_metrics",
    "get_vm_memory_metrics",
    "metrics_are_stale",
    "set_default_reader",
    "write_metrics",
]

# Upstream's C constant names, for code ported from C.
M_INT32 = MetricType.INT32
M_UINT32 = MetricType.UINT32
M_INT64 = MetricType.INT64
M_UINT64 = MetricType.UINT64
M_REAL32 = MetricType.REAL32
M_REAL64 = MetricType.REAL64
M_STRING = MetricType.STRING
METRIC_CONTEXT_HOST = MetricContext.HOST
METRIC_CONTEXT_VM = MetricContext.VM

_lock = threading.Lock()
_default: Optional[MetricsReader] = None


def set_default_reader(reader: Optional[MetricsReader]) -> None:
    """Use ``reader`` for the module-level functions (None: back to the auto-discovered disk)."""
    global _default
    with _lock:
        _default = reader


def default_reader() -> MetricsReader:
    """The reader the module-level functions use (created on first use, no I/O until a read)."""
    global _default
    with _lock:
        if _default is None:
            _default = MetricsReader()
        return _default


def get_metric(
    name: str,
    context: Union[MetricContext, str] = MetricContext.HOST,
    *,
    reader: Optional[MetricsReader] = None,
) -> Metric:
    """The metric ``name`` in ``context``; ``.value`` is int, float or str by its type."""
    return (reader or default_reader()).get(name, context)


class _CpuFields(NamedTuple):
    total_phys_cpus: Optional[int]
    num_phys_cpus_utilized: Optional[int]
    total_cpu_time: Optional[float]


class CpuMetrics(_CpuFields):
    """Upstream's ``cpu_metrics``; a field is None when its metric is absent."""

    __slots__ = ()

    def __new__(
        cls,
        total_phys_cpus: Optional[int] = None,
        num_phys_cpus_utilized: Optional[int] = None,
        total_cpu_time: Optional[float] = None,
    ) -> "CpuMetrics":
        return super().__new__(cls, total_phys_cpus, num_phys_cpus_utilized, total_cpu_time)


class HostCpuMetrics(CpuMetrics):
    """Host CPU record: TotalPhyCPUs, NumCPUs, TotalCPUTime (host context)."""

    __slots__ = ()


class VmCpuMetrics(CpuMetrics):
    """This VM's CPU record: NumCPUs, TotalCPUTime (vm context; total_phys_cpus stays None)."""

    __slots__ = ()


class _MemoryFields(NamedTuple):
    total_physical_memory: Optional[int]
    used_physical_memory: Optional[int]
    free_physical_memory: Optional[int]
    paged_out_memory: Optional[int]
    paged_in_memory: Optional[int]
    page_in_rate: Optional[int]
    page_fault_rate: Optional[int]


class MemoryMetrics(_MemoryFields):
    """Upstream's ``memory_metrics``; a field is None when its metric is absent."""

    __slots__ = ()

    def __new__(
        cls,
        total_physical_memory: Optional[int] = None,
        used_physical_memory: Optional[int] = None,
        free_physical_memory: Optional[int] = None,
        paged_out_memory: Optional[int] = None,
        paged_in_memory: Optional[int] = None,
        page_in_rate: Optional[int] = None,
        page_fault_rate: Optional[int] = None,
    ) -> "MemoryMetrics":
        return super().__new__(
            cls,
            total_physical_memory,
            used_physical_memory,
            free_physical_memory,
            paged_out_memory,
            paged_in_memory,
            page_in_rate,
            page_fault_rate,
        )


class HostMemoryMetrics(MemoryMetrics):
    """Host memory record (host context)."""

    __slots__ = ()


class VmMemoryMetrics(MemoryMetrics):
    """This VM's memory record (vm context)."""

    __slots__ = ()


def _lookup(
    reader: MetricsReader, doc: MetricsDocument, name: str, context: MetricContext
) -> Optional[Metric]:
    try:
        return reader.get(name, context, document=doc)
    except MetricNotFoundError:
        return None


def _int(
    reader: MetricsReader, doc: MetricsDocument, name: str, ctx: MetricContext
) -> Optional[int]:
    metric = _lookup(reader, doc, name, ctx)
    if metric is None:
        return None
    value = metric.value
    if not isinstance(value, int):
        raise MetricValueError(
            name, metric.type_name, metric.raw_value, "an integer type is expected"
        )
    return value


def _real(
    reader: MetricsReader, doc: MetricsDocument, name: str, ctx: MetricContext
) -> Optional[float]:
    metric = _lookup(reader, doc, name, ctx)
    if metric is None:
        return None
    value = metric.value
    if isinstance(value, str):
        raise MetricValueError(
            name, metric.type_name, metric.raw_value, "a numeric type is expected"
        )
    return float(value)


# Field -> metric name, the same in both contexts. Upstream's vm filler reads
# FreeMem into total_physical_memory (and again, as uint32, into
# free_physical_memory), PageFaultRate into paged_out_memory and PageInRate
# into paged_in_memory: we map every field to its own metric instead.
_MEMORY_FIELDS = (
    ("total_physical_memory", "TotalPhyMem"),
    ("used_physical_memory", "UsedMem"),
    ("free_physical_memory", "FreeMem"),
    ("paged_out_memory", "PagedOutMemory"),
    ("paged_in_memory", "PagedInMemory"),
    ("page_in_rate", "PageInRate"),
    ("page_fault_rate", "PageFaultRate"),
)


def _memory(reader: MetricsReader, ctx: MetricContext) -> Dict[str, Optional[int]]:
    doc = reader.read()  # one snapshot: every field from the same document
    return {field: _int(reader, doc, metric, ctx) for field, metric in _MEMORY_FIELDS}


def get_host_memory_metrics(*, reader: Optional[MetricsReader] = None) -> HostMemoryMetrics:
    """The host memory record."""
    return HostMemoryMetrics(**_memory(reader or default_reader(), MetricContext.HOST))


def get_vm_memory_metrics(*, reader: Optional[MetricsReader] = None) -> VmMemoryMetrics:
    """This VM's memory record."""
    return VmMemoryMetrics(**_memory(reader or default_reader(), MetricContext.VM))


def get_host_cpu_metrics(*, reader: Optional[MetricsReader] = None) -> HostCpuMetrics:
    """The host CPU record."""
    r = reader or default_reader()
    doc = r.read()
    ctx = MetricContext.HOST
    return HostCpuMetrics(
        total_phys_cpus=_int(r, doc, "TotalPhyCPUs", ctx),
        num_phys_cpus_utilized=_int(r, doc, "NumCPUs", ctx),
        total_cpu_time=_real(r, doc, "TotalCPUTime", ctx),
    )


def get_vm_cpu_metrics(*, reader: Optional[MetricsReader] = None) -> VmCpuMetrics:
    """This VM's CPU record; TotalCPUTime is real64 (upstream truncates it through a uint32)."""
    r = reader or default_reader()
    doc = r.read()
    ctx = MetricContext.VM
    return VmCpuMetrics(
        num_phys_cpus_utilized=_int(r, doc, "NumCPUs", ctx),
        total_cpu_time=_real(r, doc, "TotalCPUTime", ctx),
    )


def get_metrics_age(*, reader: Optional[MetricsReader] = None) -> float:
    """Seconds since the host published the document (MetricsReader.age)."""
    return (reader or default_reader()).age()


def metrics_are_stale(factor: float = 2.0, *, reader: Optional[MetricsReader] = None) -> bool:
    """Whether the host has stopped updating the metrics (MetricsReader.is_stale)."""
    return (reader or default_reader()).is_stale(factor)


def get_host_identity(*, reader: Optional[MetricsReader] = None) -> Optional[str]:
    """The host's HostIdentity, None when not published (MetricsReader.host_identity)."""
    return (reader or default_reader()).host_identity()


def write_metrics(data: bytes, dest: Optional[StrPath] = None) -> None:
    """Write ``data`` to the file ``dest`` (created/truncated) or, with None, to stdout."""
    if dest is None:
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except OSError as err:
            raise DestinationError(
                None, f"unable to export metrics to stdout: {err.strerror}", err.errno
            ) from err
        return
    path = os.fspath(dest)
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as err:
        raise DestinationError(
            path, f"unable to dump metrics to {path}: {err.strerror}", err.errno
        ) from err


def dump_metrics(dest: Optional[StrPath] = None, *, source: Optional[DiskSource] = None) -> bytes:
    """Read the metrics disk and write its document to ``dest`` (stdout if None); returns it."""
    _path, content = fetch_disk_metrics(source or DiskSource())
    write_metrics(content, dest)
    return content


def dump_virtio_metrics(
    dest: Optional[StrPath] = None, *, source: Optional[VirtioSource] = None
) -> bytes:
    """Ask the host over virtio and write the reply to ``dest`` (stdout if None); returns it."""
    reply = fetch_virtio_metrics(source or VirtioSource())
    write_metrics(reply, dest)
    return reply


def dump_xenstore_metrics(dest: Optional[StrPath] = None) -> bytes:
    """Read the metrics from xenstore and write them to ``dest`` (stdout if None); returns them."""
    data = fetch_xenstore_metrics()
    write_metrics(data, dest)
    return data
