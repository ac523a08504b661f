"""vhostmd_guest: what a guest runs to read the metrics its host publishes.

vm_dump_metrics / vm-dump-metrics (``cli``), the libmetrics API
(``libmetrics``) and the reader object (``reader.MetricsReader``). Importing
the package does no work and pulls in neither libvirt nor the host daemon:
only the wire format (``vhostmd_wire``) is shared with the host.
"""

__version__ = "0.1.0"
