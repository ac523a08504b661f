"""VM records for host tests: libvirt's test:///default domain and made-up ones."""

from __future__ import annotations

from vhostmd_py.sources.vm import VM

# The one running domain of libvirt's test:///default.
TEST_VM = VM(1, "test", "6695eb01-f6a4-8304-79aa-97f2502e193f")


def vm_named(name: str, vm_id: int = 5) -> VM:
    """A VM with NAME and a UUID derived from VM_ID."""
    return VM(vm_id, name, f"00000000-0000-4000-8000-{vm_id:012d}")
