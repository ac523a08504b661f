"""Where metric values come from: shell actions, built-in libvirt and /proc sources,
the VM lister."""
