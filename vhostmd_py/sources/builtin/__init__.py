"""Built-in metric sources: libvirt statistics and /proc, no process per value.

catalogue (field names, no libvirt import), hostproc (/proc, /sys),
domstats (libvirt bulk or per-domain calls, blocking), source (the async
NativeSource the collector routes <source> metrics to).
"""
