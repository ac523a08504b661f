"""Where a cycle's document goes: the metrics disk, per-VM disks, virtio, the endpoint."""
