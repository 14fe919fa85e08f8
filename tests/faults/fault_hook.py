"""Test harness only: make a training rank fail on cue. Product code never calls this; it is installed by
sitecustomize.py (beside it) in every process started with this folder on PYTHONPATH, or by a test in its own.

TRAINFLOW_INJECT_FAULT="kill|hang|cut:RANK:STEP:MARKER": once rank RANK has finished STEP steps (in this
process), it SIGKILLs itself, hangs, or pulls its host's network cable (`ip link set eth0 down` in the host's
network namespace, tests/multihost.py) and goes on into its next collective; the marker file makes the fault
fire once, so the relaunch goes on.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

FAULT_ENV = "TRAINFLOW_INJECT_FAULT"


def install() -> None:
    from tasks.training.watchdog import Watchdog

    if getattr(Watchdog.step, "injects_faults", False):
        return
    finished = Watchdog.step

    def step(self) -> None:
        finished(self)
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return
        kind, rank, at, marker = spec.split(":", 3)
        self.steps_seen = getattr(self, "steps_seen", 0) + 1
        if int(rank) == self.rank and self.steps_seen == int(at) and not os.path.exists(marker):
            Path(marker).write_text(f"{kind} rank {self.rank} at step {at}\n")
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "cut":
                subprocess.run(["ip", "link", "set", "eth0", "down"], check=True)
                return
            time.sleep(10**6)  # hang

    step.injects_faults = True
    Watchdog.step = step
