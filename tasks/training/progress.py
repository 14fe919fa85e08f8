"""Live progress of the train stage, for whoever waits on it.

Rank 0 appends one JSON line per epoch to `progress.jsonl` in the run's staging directory (tasks/train.py),
wherever it runs (this process, a local rank, a torchrun rank, a Dask worker on a shared filesystem). The
stage's own process follows that file and reports each epoch: a line (epoch, train loss, validation RMSE,
learning rate, samples/s, seconds, ETA) in the log, which the Prefect task log captures, a rich progress bar
on a terminal, and a callback (the flow's progress artifact).
"""

from __future__ import annotations

import contextvars
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.metrics import val_metric


def describe(record: dict, epochs: int, eta_s: float) -> str:
    speed = f"  {record['samples_per_s']:,.0f} samples/s" if record.get("samples_per_s") else ""
    return (
        f"train: epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f}  {val_metric(record)}"
        f"  lr {record['lr']:.2e}{speed}  {record['seconds']:.1f} s  ETA {eta(eta_s)}"
    )


def eta(seconds: float) -> str:
    """At most this long: early stopping may end training sooner."""
    return f"≤{seconds:.0f} s" if seconds < 120 else f"≤{seconds / 60:.0f} min"


class Progress:
    """Follow a progress file while training runs (a context manager); report every new epoch."""

    def __init__(self, path: Path, epochs: int, on_epoch: Callable[[dict], None] | None = None, poll_s: float = 0.25):
        self.path, self.epochs, self.on_epoch, self.poll_s = Path(path), epochs, on_epoch, poll_s
        self.offset = self.path.stat().st_size if self.path.exists() else 0  # epochs of an earlier attempt: reported then
        self.seconds: list[float] = []
        self.stopped = threading.Event()
        self.bar: Any = None  # a rich progress bar on a terminal

    def __enter__(self) -> Progress:
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"), TimeElapsedColumn(), transient=True
            )
            self.task = self.bar.add_task("train", total=self.epochs)
            self.bar.start()
        context = contextvars.copy_context()  # the Prefect task's: its logger and print capture work in the thread
        self.thread = threading.Thread(target=context.run, args=(self._follow,), name="trainflow-progress", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()
        if self.bar is not None:
            self.bar.stop()

    def _follow(self) -> None:
        while not self.stopped.wait(self.poll_s):
            self._read()
        self._read()  # what the last epoch wrote

    def _read(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]  # a line being written is read next time
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            self.report(json.loads(line))

    def report(self, record: dict) -> None:
        self.seconds.append(record["seconds"])
        recent = self.seconds[-5:]
        text = describe(record, self.epochs, sum(recent) / len(recent) * (self.epochs - record["epoch"]))
        if self.bar is not None:
            self.bar.console.print(text)
            self.bar.update(self.task, completed=record["epoch"])
        else:
            print(text, flush=True)
        if self.on_epoch is not None:
            self.on_epoch(record | {"epochs": self.epochs})
