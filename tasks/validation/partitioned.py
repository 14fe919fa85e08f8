"""Validation of data bigger than one pandas frame: the suite runs per Dask partition, in parallel, and the
results are added up exactly (used by tasks/validate.py above `validate.in_memory_max_rows`, or for a
directory of Parquet files).

Great Expectations has no Dask engine, so each partition is validated by GX's pandas engine (or by the
same pandas kernels without GX's per-batch machinery where that gives exactly GX's result: direct.py) and
the partition results are merged into what one validation of the whole table gives, field for field:
- row-level expectations (nulls, ranges, sets): counts add up, percents are recomputed from the summed
  counts with GX's formulas, row numbers are shifted by each partition's global offset, samples are the
  first ones in global order;
- uniqueness across partitions: duplicate values are found over the whole column first (Dask
  value_counts), then each partition marks its rows holding one, as GX marks every row of a duplicate;
- table-level: the row count is the sum of the partitions'; columns and types must hold in every one;
- reference statistics and drift (min/max, mean, std, quantiles): over the whole column, one Dask task per
  column, with the same code as the in-memory path.
A test checks that the report, the clean rows, the quarantine file and the reference equal the in-memory ones.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from tasks.tables import Piece, as_validated, pieces, read_piece
from tasks.validation.direct import direct_results
from tasks.validation.drift import column_drift, column_stat
from tasks.validation.report import non_numbers, quarantine_frame
from tasks.validation.suite import SAMPLES, json_value, run_suite

UNIQUE = "expect_column_values_to_be_unique"


def check_piece(piece: Piece, suite: dict, duplicates: dict[str, list]) -> dict:
    """The suite on one partition (GX's kernels directly where that is exact, else GX); uniqueness against
    the duplicates of the whole column. Row numbers are local."""
    frame = read_piece(piece)
    results = direct_results(frame, suite)
    if results is None:
        results = run_suite(frame, suite)
    for r in results:
        if r["expectation"] == UNIQUE and r["column"] in frame and "unexpected_count" in r:
            r.update(unique_rows(frame[r["column"]], duplicates[r["column"]]))
    return {"rows": len(frame), "results": results, "non_numbers": non_numbers(frame, suite, offset=piece.offset)}


def unique_rows(col: pd.Series, duplicates: list) -> dict:
    present = col.notna()
    bad = col[present & col.isin(duplicates)]
    return {
        "unexpected_count": len(bad),
        "_rows": [int(i) for i in bad.index],
        "_n": len(col),
        "_missing": int((~present).sum()),
        "sample_rows": [int(i) for i in bad.index[:SAMPLES]],
        "sample_values": [json_value(v) for v in bad.head(SAMPLES)],
    }


def merge(parts: list[dict], offsets: list[int], total_rows: int) -> list[dict]:
    """One result per expectation, as a single validation of the whole table reports it."""
    return [merge_one([p["results"][k] for p in parts], offsets, total_rows) for k in range(len(parts[0]["results"]))]


def merge_one(rs: list[dict], offsets: list[int], total_rows: int) -> dict:
    first = rs[0]
    errors = [r for r in rs if "error" in r]
    if errors:
        return errors[0]
    if "_bounds" in first:  # the table's row count
        low, high = first["_bounds"]
        ok = (low is None or total_rows >= low) and (high is None or total_rows <= high)
        return first | {"success": ok, "observed": total_rows}
    if "unexpected_count" not in first:  # columns, types: must hold in every partition
        return next((r for r in rs if not r["success"]), first)
    n, missing = sum(r["_n"] for r in rs), sum(r["_missing"] for r in rs)
    unexpected = sum(r["unexpected_count"] for r in rs)
    if first["expectation"] == "expect_column_values_to_not_be_null":  # GX counts these over all rows
        considered = n
    else:
        considered = n - missing
    mostly = first["_mostly"] if first["_mostly"] is not None else 1.0
    success = True if considered == 0 else (float(considered) - float(unexpected)) / float(considered) >= mostly
    percent = unexpected / considered * 100 if considered > 0 else 0.0
    samples = [(i + off, v) for r, off in zip(rs, offsets) for i, v in zip(r["sample_rows"], r["sample_values"])][:SAMPLES]
    return first | {
        "success": success,
        "unexpected_count": unexpected,
        "unexpected_percent": round(float(percent), 4),
        "sample_values": [v for _, v in samples],
        "sample_rows": [i for i, _ in samples],
        "_rows": [i + off for r, off in zip(rs, offsets) for i in r["_rows"]],
        "_n": n,
        "_missing": missing,
    }


def write_piece(piece: Piece, drop: list[int], out: str) -> pd.DataFrame:
    """Write the piece without the rows `drop` (global numbers) to `out`; return those rows."""
    frame = read_piece(piece)
    local = [i - piece.offset for i in drop]
    frame.drop(index=local).to_parquet(out, index=False)
    return frame.loc[local]


def read_column(files: list[str], name: str) -> pd.Series:
    """One column of all the files, in order, with the dtype the whole table has in memory (a table's pandas
    metadata restores nullable dtypes such as Int8 and boolean; a lone Arrow column would not)."""
    parts = [as_validated(pq.read_table(f, columns=[name]).to_pandas())[name] for f in files]
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def summarize_column(files: list[str], name: str, reference: dict | None, max_mean_shift: float, max_psi: float):
    col = read_column(files, name)
    return column_stat(col), (column_drift(reference, col, max_mean_shift, max_psi) if reference is not None else None)


class Partitioned:
    """The input cut into partitions of whole row groups, each checked and written by a Dask task."""

    mode = "partitioned"

    def __init__(self, client, files: list[Path], suite: dict, partition_rows: int, drift):
        self.client, self.files, self.suite, self.drift = client, files, suite, drift
        self.pieces = pieces(files, partition_rows)
        self.partitions = len(self.pieces)
        self.summaries: dict = {}

    def duplicates(self) -> dict[str, list]:
        """Values that occur more than once in each unique-key column, over all partitions."""
        keys = [c for c, spec in self.suite["columns"].items() if spec.get("unique")]
        if not keys:
            return {}
        import dask.dataframe as dd  # only here: its import takes a second

        present = set(pq.read_schema(self.files[0]).names)
        found: dict[str, list] = {}
        for c in keys:
            if c not in present:
                found[c] = []
                continue
            counts = dd.read_parquet([str(f) for f in self.files], columns=[c])[c].value_counts(split_out=1)
            found[c] = counts[counts > 1].compute().index.tolist()
        return found

    def check(self) -> tuple[list[dict], dict]:
        # first, as they need no GX (whose import takes seconds): statistics and drift of the input as it
        # is, which is what is accepted when no row is quarantined (the usual case)
        self.summaries = self.submit_summaries(self.files)
        duplicates = self.duplicates()
        checks = self.client.map(check_piece, self.pieces, suite=self.suite, duplicates=duplicates, pure=False)
        parts = self.client.gather(checks)
        results = merge(parts, [p.offset for p in self.pieces], sum(p.rows for p in self.pieces))
        text: dict = {}
        for part in parts:
            for name, d in part["non_numbers"].items():
                t = text.setdefault(name, {"type": d["type"], "count": 0, "samples": []})
                t["count"] += d["count"]
                t["samples"] = (t["samples"] + d["samples"])[:SAMPLES]
        return results, text

    def submit_summaries(self, files: list[Path]) -> dict:
        names = pq.read_schema(files[0]).names
        ref, paths = self.drift.reference, [str(f) for f in files]
        return {
            n: self.client.submit(
                summarize_column,
                paths,
                n,
                ref.get(n) if ref is not None else None,
                self.drift.max_mean_shift,
                self.drift.max_psi,
                pure=False,
            )
            for n in names
        }

    def write(self, out: Path, reasons: pd.Series) -> pd.DataFrame:
        """With rows to remove, the clean rows as a directory of part files at `out` (else it holds the
        input's copy already); return the quarantined rows."""
        if not len(reasons):
            schema = pq.read_schema(self.files[0])
            return quarantine_frame(as_validated(schema.empty_table().to_pandas()), reasons)
        self.client.cancel(list(self.summaries.values()))
        out.mkdir()
        rows = reasons.index.to_numpy()
        drops = [rows[(rows >= p.offset) & (rows < p.offset + p.rows)].tolist() for p in self.pieces]
        names = [str(out / f"part-{i:05d}.parquet") for i in range(len(self.pieces))]
        taken = self.client.gather(self.client.map(write_piece, self.pieces, drops, names, pure=False))
        self.summaries = self.submit_summaries(sorted(out.glob("*.parquet")))
        return quarantine_frame(pd.concat(taken, ignore_index=True), reasons)

    def summarize(self, out: Path) -> tuple[dict, dict]:
        found = dict(zip(self.summaries, self.client.gather(list(self.summaries.values()))))
        stats = {n: s for n, (s, _) in found.items()}
        order = list(self.drift.reference) if self.drift.reference is not None else []
        return stats, {n: found[n][1] for n in order if n in found and found[n][1]}
