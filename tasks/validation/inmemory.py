"""Validation of an input that fits in memory: one pandas frame, one GX validation."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pandas as pd

from tasks.tables import read_all
from tasks.validation.drift import column_stats, compare
from tasks.validation.report import non_numbers, quarantine_frame
from tasks.validation.suite import run_suite


class InMemory:
    """The whole input as one pandas frame, checked by one GX validation."""

    mode = "in-memory"

    def __init__(self, files: list[Path], suite: dict, drift: Drift):
        self.files, self.suite, self.drift, self.frame = files, suite, drift, read_all(files)
        self.partitions = 1

    def check(self) -> tuple[list[dict], dict]:
        return run_suite(self.frame, self.suite), non_numbers(self.frame, self.suite)

    def write(self, out: Path, reasons: pd.Series) -> pd.DataFrame:
        """With rows to remove, write the clean rows to `out` (else it holds the input's copy already);
        return the quarantined rows."""
        self.clean = self.frame.drop(index=reasons.index) if len(reasons) else self.frame
        if len(reasons):
            self.clean.to_parquet(out, index=False)
        return quarantine_frame(self.frame.loc[reasons.index], reasons)

    def summarize(self, out: Path) -> tuple[dict, dict]:
        """Statistics of the clean rows (the next reference) and their drift from the last reference."""
        d = self.drift
        drifted = compare(d.reference, self.clean, d.max_mean_shift, d.max_psi) if d.reference is not None else {}
        return column_stats(self.clean), drifted


class Drift(NamedTuple):
    reference: dict | None  # columns of this dataset's last accepted data's statistics; None: not checked
    max_mean_shift: float
    max_psi: float
    key: str = ""  # the dataset's entry in the reference file (tasks/validation/reference.py)
    why: str = ""  # why there is no reference to compare with
