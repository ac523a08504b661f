"""virtio-serial transport: answer each VM's metrics requests on its QEMU channel.

Its parts, one job each:
- protocol: what one connection says (request parsing, the reply, framing state);
- discovery: where each VM's socket is (channel directories, inotify, matching to VMs);
- channels: which VMs have a channel (at most max_channels), expiry;
- connect: one connect attempt on a socket, and its back-off;
- channel_io: reads and replies on the connected sockets, within a share of the loop;
- server: VirtioServer, which runs them on the daemon's loop, and the fd limit.
"""

from vhostmd_py.publish.virtio.server import VirtioServer, VirtioSettings

__all__ = ["VirtioServer", "VirtioSettings"]
