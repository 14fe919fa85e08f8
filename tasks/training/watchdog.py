"""A rank that stops making progress is hung: its stacks are logged and it ends, so the group restarts.

A hang (a deadlocked collective, a stuck filesystem, a GPU that stopped answering) would otherwise hold a
whole run, its GPUs and its workspace lock forever. Each rank runs one watchdog thread; the loop reports
every finished step (`step`) and other progress (`beat`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class Watchdog:
    """A rank that makes no progress (a step, a validation) for timeout_s seconds is hung: dump every
    thread's Python stack to stderr (the run's log) and end the process, so the launcher tears the group
    down and restarts it from the last checkpoint."""

    EXIT = 86  # the exit code that says "hung", for the launcher
    fired = False  # in-process (one rank in the stage's own process): the main thread is interrupted instead

    def __init__(self, timeout_s: float, rank: int, in_process: bool, dump_to: Path | None = None):
        import threading

        self.timeout, self.rank, self.last, self.in_process = timeout_s, rank, time.monotonic(), in_process
        self.dump_to = dump_to  # the stacks also go here: a Dask worker's stderr is on another machine
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="trainflow-watchdog", daemon=True)
        self.thread.start()

    def beat(self) -> None:
        """Progress other than a step (a validation pass)."""
        self.last = time.monotonic()

    def step(self) -> None:
        """A training step finished."""
        self.last = time.monotonic()

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        import faulthandler
        import sys

        while not self.stopped.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                print(
                    f"train: rank {self.rank} finished no step in {idle:.0f} s (train.step_timeout_s={self.timeout:g}): "
                    "hung. Its Python stacks:",
                    file=sys.stderr,
                    flush=True,
                )
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                try:
                    if self.dump_to is None:
                        raise TypeError("no file to dump to")
                    with open(self.dump_to, "w") as f:
                        f.write(f"rank {self.rank} finished no step in {idle:.0f} s (train.step_timeout_s={self.timeout:g})\n")
                        f.flush()
                        faulthandler.dump_traceback(file=f, all_threads=True)
                except (OSError, TypeError):  # no file to write to: stderr has the stacks
                    pass
                if self.in_process:
                    import _thread

                    Watchdog.fired = True
                    _thread.interrupt_main()
                    return
                os._exit(self.EXIT)
