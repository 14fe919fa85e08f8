"""The suite's expectations on one partition without Great Expectations' machinery: the same pandas
kernels GX's pandas engine applies, with GX's result fields (used by tasks/validation/partitioned.py).

Per 1M-row partition GX spends ~0.3 s of held GIL building its metric graph, hashing the frame for a
batch id and converting its results, around kernels that take a few ms; the partitions of a big input
queue on that GIL. Here each row-level expectation is the kernel GX runs (great_expectations 1.24.1,
expectations/metrics/column_map_metrics/*): nulls `column.isnull()`; between `min <= column <= max` with
GX's float bounds; sets `column.isin(values)`; unique `column.duplicated(keep=False)`; the last three on
the non-null values, as GX filters them. Counts, percents, success with `mostly`, the first
SAMPLES values and the row numbers follow GX's ColumnMapExpectation._validate and _format_map_output.

Only what this reproduces exactly is done here: a partition whose columns differ from the suite, or with a
column of another dtype (timestamps, nullable or Arrow dtypes, float32, a text column with a min/max, ...)
returns None and goes to GX. GX stays the engine of record: the in-memory path always runs it, and
tests/test_validate_direct.py checks this module against GX, field for field, on real data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tasks.tables import as_validated
from tasks.validation.suite import SAMPLES, bound, check_types, in_report_order, json_value

_PLAIN = (np.dtype(np.float64), np.dtype(np.int64))  # GX's vectorised between (`column.dtype in [int, float]`)


def direct_results(frame: pd.DataFrame, suite: dict) -> list[dict] | None:
    """run_suite's results for `frame`, or None when a column is not one whose results this reproduces."""
    cols, counts = suite["columns"], suite.get("row_count", {})
    if list(frame.columns) != list(cols) or not all(_plain(frame[n], spec) for n, spec in cols.items()):
        return None
    if not all(type(counts.get(k)) in (int, type(None)) for k in ("min", "max")):  # GX would coerce these
        return None
    out = [
        {"expectation": "expect_table_columns_to_match_ordered_list", "column": None, "success": True}
        | {"bound": bound("", {"column_list": list(cols)}), "observed": list(frame.columns)}
    ]
    if "row_count" in suite:
        low, high = suite["row_count"].get("min"), suite["row_count"].get("max")
        ok = (low is None or len(frame) >= low) and (high is None or len(frame) <= high)
        kwargs = {"min_value": low, "max_value": high}
        out.append(
            {"expectation": "expect_table_row_count_to_be_between", "column": None, "success": ok}
            | {"bound": bound("", kwargs), "_bounds": [low, high], "observed": len(frame)}
        )
    for name, spec in cols.items():
        col = frame[name]
        present = col.notna()
        x = col[present]  # GX's column for the expectations that skip nulls
        out.append(_result("expect_column_values_to_not_be_null", col, ~present, None, mostly=1 - spec.get("nulls", 0)))
        if "min" in spec or "max" in spec:
            lo, hi = (None if spec.get(k) is None else float(spec[k]) for k in ("min", "max"))
            bad = _on(present, ~((x >= lo if lo is not None else True) & (x <= hi if hi is not None else True)))
            out.append(_result("expect_column_values_to_be_between", col, bad, present, min_value=lo, max_value=hi))
        if "values" in spec:
            values = list(spec["values"])
            bad = _on(present, ~x.isin(values))
            out.append(_result("expect_column_values_to_be_in_set", col, bad, present, value_set=values))
        if spec.get("unique"):
            out.append(_result("expect_column_values_to_be_unique", col, _on(present, x.duplicated(keep=False)), present))
    return in_report_order(out + check_types(frame, suite), suite)


def needs_gx(files: list[Path], suite: dict) -> bool:
    """Whether partitions of these files go to GX (known from their schemas: GX's import takes seconds)."""
    return any(direct_results(as_validated(pq.read_schema(f).empty_table().to_pandas()), suite) is None for f in files)


def _plain(col: pd.Series, spec: dict) -> bool:
    """A column whose kernels here are GX's: float64 or int64 (with bounds GX accepts), or object (text)
    without a min or max; and a `nulls` GX accepts."""
    lo, hi, nulls = spec.get("min"), spec.get("max"), spec.get("nulls", 0)
    if type(nulls) not in (int, float) or not 0 <= nulls <= 1:  # GX refuses such a `mostly`
        return False
    if "min" in spec or "max" in spec:
        return col.dtype in _PLAIN and not (lo is None and hi is None) and (lo is None or hi is None or lo <= hi)
    return col.dtype in _PLAIN or col.dtype == object


def _on(present: pd.Series, unexpected: pd.Series) -> np.ndarray:
    """A mask over the non-null rows, as one over all rows."""
    full = np.zeros(len(present), dtype=bool)
    full[present.to_numpy()] = unexpected.to_numpy(dtype=bool)
    return full


def _result(kind: str, col: pd.Series, unexpected, present: pd.Series | None, mostly: float = 1.0, **kwargs) -> dict:
    """One column-map result as suite._summarize makes it of GX's. `present` None: nulls are not
    skipped (the not-null expectation, which counts over all rows and reports no missing count)."""
    unexpected = np.asarray(unexpected, dtype=bool)
    rows = np.flatnonzero(unexpected)
    n, count = len(col), len(rows)
    considered = n if present is None else int(present.sum())
    success = considered == 0 or (float(considered) - float(count)) / float(considered) >= mostly  # vacuous without rows
    percent = count / considered * 100 if considered > 0 else 0.0
    index = col.index[rows]
    gx_mostly = None if mostly == 1 else mostly  # GX leaves its default (1) out of the kwargs
    return {
        "expectation": kind,
        "column": col.name,
        "success": bool(success),
        "bound": bound(kind, kwargs | ({"mostly": gx_mostly} if gx_mostly is not None else {})),
        "unexpected_count": count,
        "unexpected_percent": round(float(percent), 4),
        "sample_values": [json_value(v) for v in col.iloc[rows[:SAMPLES]]],
        "sample_rows": [int(i) for i in index[:SAMPLES]],
        "_rows": [int(i) for i in index],
        "_n": n,
        "_missing": 0 if present is None else n - considered,
        "_mostly": gx_mostly,
    }
