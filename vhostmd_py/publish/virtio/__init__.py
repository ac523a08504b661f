"""virtio-serial transport: answer each VM's metrics requests on its QEMU channel.

Three parts, one job each:
- protocol: what one connection says (request parsing, the reply, framing state);
- discovery: where each VM's socket is (channel directories, inotify, matching to VMs);
- server: VirtioServer, the channels, connect back-off, the I/O loop and fd limits.
"""

from vhostmd_py.publish.virtio.server import VirtioServer, VirtioSettings

__all__ = ["VirtioServer", "VirtioSettings"]
