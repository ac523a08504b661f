"""``vhostmdctl``: the operator's command, one module per command family."""
