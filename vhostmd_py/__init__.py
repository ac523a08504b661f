"""vhostmd-py: a wire-compatible reimplementation of vhostmd 1.2.

Importing this package does no work and pulls in neither libvirt nor the
compiled extension: the guest tools import the disk format from here.
"""

__version__ = "0.1.0"
