"""``python -m vhostmd_guest``: same as vm-dump-metrics."""

from .cli import main

main()
