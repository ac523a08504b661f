"""vhostmd_wire: what the vhostmd host and its guests must agree on, byte for byte.

The metrics disk layout (disk), the document's framing and the virtio
protocol constants (protocol), the hardened document parser with the metric
type rules (document), and the one error root both sides derive from
(errors). Standard library only, Python 3.6 and later: the host package
(vhostmd_py) and the guest package (vhostmd_guest) import this package,
neither imports the other.
"""

__version__ = "0.1.0"
