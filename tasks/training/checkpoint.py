"""The training checkpoint contract: enough to resume a run exactly, written safely, loaded safely.

A checkpoint (`step-00000123.pt`) holds the model, optimizer and LR scheduler states, the epoch and the
step within it, the data-order state (the permutation generator's state at the start of the epoch and the
position in it), every rank's RNG states (torch, CUDA, numpy, python), and the early-stopping state
(best model so far, its epoch, epochs without improvement, the metrics history). A resumed run therefore
sees the same batches in the same order and ends with the parameters of an uninterrupted one.

It is written to a temporary file and renamed, then its sha256 is written beside it (`.sha256`, also
renamed into place): a checkpoint without a matching hash file is incomplete or corrupt. Loading checks the
hash, loads with `torch.load(weights_only=True)` (tensors and plain containers only: nothing is unpickled
as arbitrary objects), checks the format and the run it belongs to, and falls back to the previous valid
checkpoint, with a warning, when the latest is corrupt or truncated. The last `train.keep_checkpoints` are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch

from tasks.errors import UserError
from tasks.files import atomic_path, sha256_file

log = logging.getLogger(__name__)

FORMAT = 1
NAME = re.compile(r"^step-(\d{8})\.pt$")
REQUIRED = {
    "format",
    "fingerprint",
    "arch",
    "model",
    "optimizer",
    "scheduler",
    "epoch",
    "step_in_epoch",
    "steps",
    "order_state",
    "rng",
    "best",
    "history",
}


def fingerprint(train: dict, features: dict) -> str:
    """What makes two runs the same run: the training settings that shape the result, and the features."""
    keep = {
        k: v
        for k, v in train.items()
        if k
        not in (
            "out_dir",
            "log_dir",
            "keep_checkpoints",
            "checkpoint_every",
            "max_restarts",
            "step_timeout_s",
            "launcher",
            "elastic",
            "rejoin_timeout_s",
        )
    }
    return hashlib.sha256(json.dumps({"train": keep, "features": features}, sort_keys=True).encode()).hexdigest()


def staging_dir(out_dir: str) -> Path:
    """Where a training run works (checkpoints, progress, logs) until its model replaces train.out_dir; it outlives
    a killed run, which therefore resumes."""
    out = Path(out_dir)
    return out.with_name(f".{out.name}.partial")


def path_for(directory: Path, steps: int) -> Path:
    return directory / f"step-{steps:08d}.pt"


def save(directory: Path, state: dict, keep: int) -> Path:
    """Write atomically, then the sha256 beside it; drop the oldest beyond `keep`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = path_for(directory, state["steps"])
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)
    with atomic_path(path.with_suffix(".sha256")) as tmp:
        Path(tmp).write_text(sha256_file(path) + "\n")
    for old in listed(directory)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_suffix(".sha256").unlink(missing_ok=True)
    return path


def listed(directory: Path) -> list[Path]:
    """Checkpoints oldest first."""
    return sorted(p for p in directory.glob("step-*.pt") if NAME.match(p.name)) if directory.exists() else []


def read(path: Path) -> dict:
    """One checkpoint, verified: hash, safe load, format, contract. UserError says what is wrong."""
    digest = path.with_suffix(".sha256")
    if not digest.exists():
        raise ValueError(f"{path.name} has no {digest.name} (written last): the write did not finish")
    if sha256_file(path) != digest.read_text().strip():
        raise ValueError(f"{path.name} does not match its sha256: corrupt or truncated")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"{path} is not a Trainflow checkpoint (it holds objects a checkpoint never does, and was not "
            f"unpickled): {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UserError(
            f"{path} is checkpoint format {got}, and this Trainflow reads format {FORMAT}; it was written by "
            "another version: delete it (or the run's staging directory) to train from the start"
        )
    missing = REQUIRED - set(state)
    if missing:
        raise UserError(f"{path} lacks {sorted(missing)}: not a Trainflow checkpoint")
    return state


def load_latest(directory: Path, fingerprint_: str) -> dict | None:
    """The newest valid checkpoint of this run, or None. A corrupt or unfinished one is skipped with a
    warning (the one before is used); checkpoints of another run (other params or features) are not used."""
    for path in reversed(listed(directory)):
        try:
            state = read(path)
        except ValueError as e:
            log.warning("checkpoint %s skipped: %s; falling back to the one before", path, e)
            continue
        return state | {"path": str(path)} if state["fingerprint"] == fingerprint_ else None
    return None


def load_from(path: str | Path, arch: dict) -> dict:
    """train.resume_from: a checkpoint to continue from, refused unless it is whole, ours and of this model."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"train.resume_from: {path} does not exist")
    try:
        state = read(path)
    except ValueError as e:
        raise UserError(f"train.resume_from: {e}; pick another checkpoint") from None
    if state["arch"] != arch:
        differ = sorted(k for k in set(arch) | set(state["arch"]) if arch.get(k) != state["arch"].get(k))
        shown = "; ".join(f"{k}: {state['arch'].get(k)!r} there, {arch.get(k)!r} now" for k in differ)
        raise UserError(
            f"train.resume_from: {path} was trained with another model config ({shown}); it is not loaded, "
            "not even in part. Restore the settings it was trained with, or set train.resume_from: null"
        )
    return state | {"path": str(path)}
