"""The kinds of failure, as types, from a rank to the stage to Prefect's retry decision.

- UserError: bad input (data, params, files). One message, no traceback, exit code 2; never retried: it would
  fail the same way again.
- InfrastructureError: the machine or the network failed, not the input or the code: a rank killed (out of
  memory) or hung, a Dask worker or a connection lost, a collective that failed because a peer died. Retried:
  within training by relaunching the rank group from its last checkpoint (train.max_restarts), elsewhere by a
  Prefect task retry.
- RestartsExhausted: training kept failing for infrastructure reasons after train.max_restarts relaunches.
  Not retried again: training already did (so attempts never multiply into launcher × Prefect retries).
Anything else is a bug in Trainflow: it keeps its traceback and is not retried.

A rank in another process reports its error as a small JSON file (`record` / `recorded`), so the launcher
raises the same type wherever the rank ran (Dask carries the exception object itself).
"""

from __future__ import annotations

import json
from pathlib import Path


class TrainflowError(Exception):
    """A failure Trainflow understands: reported as one message, classified by its type."""

    exit_code = 1


class UserError(TrainflowError):
    """Bad input from the user (data, params, files). Reported as one message, without a traceback."""

    exit_code = 2


class InfrastructureError(TrainflowError):
    """A rank, a worker or a connection failed; the same work may succeed when run again."""


class RestartsExhausted(TrainflowError):
    """Training failed for infrastructure reasons more often than train.max_restarts allows."""


KINDS = {cls.__name__: cls for cls in (UserError, InfrastructureError, RestartsExhausted)}


def record(error: TrainflowError, directory: Path, rank: int) -> None:
    """A rank's classified error, for its launcher in another process (the first one written wins per rank)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rank-{rank}.json"
    if not path.exists():
        path.write_text(json.dumps({"type": type(error).__name__, "message": str(error)}))


def recorded(directory: Path) -> TrainflowError | None:
    """The error of the lowest rank that recorded one, as its type; None when none did."""
    files = sorted(directory.glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1])) if directory.exists() else []
    for path in files:
        found = json.loads(path.read_text())
        return KINDS.get(found["type"], TrainflowError)(found["message"])
    return None
