"""A daemon stand-in for the kill -9 test: feeds scripted counters to Accounting, one per step.

argv: STATE_DIR SCRIPT_JSON FIRST LAST BOOT_ID. After each step's state write it
prints "done N" and sleeps, so the parent can SIGKILL it between two writes.
"""

from __future__ import annotations

import json
import sys
import time

from vhostmd_py.config import AccountingConfig, Budget
from vhostmd_py.monitors.accounting import Accounting
from vhostmd_py.sources.stats import CycleStats, HostStats, NetStats, VmStats


def main() -> None:
    state_dir, script_file, first, last, boot_id = sys.argv[1:6]
    with open(script_file) as fh:
        script = json.load(fh)
    config = AccountingConfig(period=script["period"], period_offset=0, state_dir=state_dir,
                              guest_metrics=False, budget=Budget(), overrides=())
    acct = Accounting(config, boot_id=boot_id)
    for index in range(int(first), int(last) + 1):
        step = script["steps"][index]
        vms = tuple(
            VmStats(uuid=uuid, name=vm["name"], id=vm["id"],
                    nics=tuple(NetStats(dev, rx_bytes=c[0], tx_bytes=c[1])
                               for dev, c in vm["nics"].items()))
            for uuid, vm in step["vms"].items()
        )
        acct.update(CycleStats(wall=step["wall"], mono=step["wall"], host=HostStats(), vms=vms))
        print(f"done {index}", flush=True)
        time.sleep(0.3)


if __name__ == "__main__":
    main()
