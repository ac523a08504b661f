"""Shell actions: token substitution, the batch runner (C), orphans of actions.

The caps on an action's output live here, below both the runner (its default
cap) and vhostmd_py.sources.base (the cap per metric type), so neither
imports the other for them.
"""

# Upstream reads at most this many bytes of an action's output
# (tests/data/golden/upstream/FACTS.md, disk format: edge-4k `Long` and
# negsum-1k keep 255 bytes); xml metrics get 2047.
VALUE_CAP = 255
XML_VALUE_CAP = 2047
