"""Rank 0's record of each epoch: dvclive's metrics and plots (what `dvc metrics show` and `dvc plots show`
read), and a line in the run's progress file, which the stage's own process follows (tasks/training/progress.py)."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.files import atomic_path

# what dvclive logs: losses, the validation metric, the LR and speed; the step time's split per epoch is in
# summary.json and the flow's training-epochs artifact
LIVE_KEYS = (
    ("train/loss", "train_loss"),
    ("val/loss", "val_loss"),
    ("val/rmse", "val_rmse"),
    ("val/accuracy", "val_accuracy"),
    ("lr", "lr"),
    ("perf/samples_per_s", "samples_per_s"),
)
PROGRESS = "progress.jsonl"


def open_live(log_dir: str, resumed_epochs: int | None):
    """dvclive in train.log_dir; a resumed run continues its log after the checkpoint's epoch."""
    from dvclive import Live

    if resumed_epochs is not None:
        trim_live(Path(log_dir), resumed_epochs)
    return Live(dir=log_dir, dvcyaml=False, save_dvc_exp=False, resume=resumed_epochs is not None)


def trim_live(log_dir: Path, epochs: int) -> None:
    """Drop the dvclive rows of epochs after the checkpoint being resumed (they are trained and logged again),
    and what a killed process left half-written, so no epoch is logged twice."""
    summary = log_dir / "metrics.json"  # dvclive's summary, which it reads to resume and rewrites every epoch
    try:
        json.loads(summary.read_text())
    except FileNotFoundError:
        pass
    except ValueError:  # cut by a kill while dvclive wrote it (not atomically): the next epoch writes it anew
        summary.unlink()
    for tsv in (log_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        header = lines[0].split("\t") if lines else []
        if "step" not in header:  # empty or cut in its header: dvclive writes it anew
            tsv.unlink()
            continue
        column = header.index("step")
        kept = [r for r in lines[1:] if _logged_before(r, len(header), column, epochs)]
        if len(kept) < len(lines) - 1:
            with atomic_path(tsv) as tmp:
                Path(tmp).write_text("\n".join([lines[0], *kept]) + "\n")


def _logged_before(row: str, fields: int, column: int, epochs: int) -> bool:
    values = row.split("\t")
    try:
        return len(values) == fields and int(values[column]) <= epochs and all(v != "" for v in values)
    except ValueError:
        return False


def log_epoch(live, record: dict, progress: Path) -> None:
    """Rank 0's record of an epoch (in the writer thread): a line for the launcher's progress report
    (tasks/progress.py, whichever machine the rank runs on), and the dvclive metrics."""
    with open(progress, "a") as f:
        f.write(json.dumps(record) + "\n")
    if live is None:
        return
    live.step = record["epoch"]  # the plots' x axis is the epoch, counted from 1 as everywhere else
    for key, value in LIVE_KEYS:
        if record.get(value) is not None:
            live.log_metric(key, record[value])
    live.next_step()
