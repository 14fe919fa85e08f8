"""Check the raw data against its expectation suite with Great Expectations.  Run: python -m tasks.validate

The suite is a small reviewed YAML file (data/suites/*.yaml) built into a GX suite here. The reports
(JSON, markdown) are always written; on failure the stage raises with each failed expectation, its column,
how many rows broke it and a few sample values with their row numbers, so no later stage runs on bad data.
With validate.on_failure=quarantine, rows that break row-level expectations go to validate.quarantine
with their reasons instead. Accepted data is compared with the statistics of the last accepted data
(drift, tasks/drift.py), then written to validate.out (what preprocess reads) and becomes the reference.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import yaml

from tasks.cluster import dask_client
from tasks.drift import column_stats, compare, describe
from tasks.files import atomic_path, copy_and_hash, remove, sha256_path, staged_path, write_json
from tasks.settings import Settings, UserError, cli
from tasks.tables import count_rows, parquet_files, read_all

log = logging.getLogger(__name__)
DTYPES = {
    "float": ["float64", "float32", "Float64", "Float32"],
    "int": ["int64", "int32", "Int64", "Int32"],
    "str": ["object", "str", "string", "StringDtype", "str_"],
}
SAMPLES = 5


def load_suite(path: str | Path) -> dict:
    path = Path(path)
    try:
        suite = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"dataset.suite: {path} does not exist; point dataset.suite at an expectation suite YAML") from None
    except yaml.YAMLError as e:  # a syntax error, or a tag such as !!python/object that safe_load refuses
        raise UserError(f"dataset.suite: {path} is not a plain YAML suite ({str(e).splitlines()[0]}); write it with plain "
                        "mappings, lists and values only") from None
    if not isinstance(suite, dict) or not isinstance(suite.get("columns"), dict) or not suite["columns"]:
        raise UserError(f"dataset.suite: {path} must map 'columns' to {{name: {{type: ..., min: ..., max: ...}}}}")
    for name, spec in suite["columns"].items():
        spec = spec or {}
        unknown = set(spec) - {"type", "min", "max", "nulls", "values", "unique"}
        if unknown or spec.get("type") not in DTYPES:
            raise UserError(
                f"dataset.suite: {path}: column {name}: type must be one of {sorted(DTYPES)} "
                f"and keys among type, min, max, nulls, values, unique (got {spec})"
            )
    return suite


def build_expectations(suite: dict) -> list:
    import great_expectations.expectations as gxe

    cols = suite["columns"]
    exps = [gxe.ExpectTableColumnsToMatchOrderedList(column_list=list(cols))]
    if "row_count" in suite:
        rc = suite["row_count"]
        exps.append(gxe.ExpectTableRowCountToBeBetween(min_value=rc.get("min"), max_value=rc.get("max")))
    for name, spec in cols.items():
        exps.append(gxe.ExpectColumnValuesToBeInTypeList(column=name, type_list=DTYPES[spec["type"]]))
        exps.append(gxe.ExpectColumnValuesToNotBeNull(column=name, mostly=1 - spec.get("nulls", 0)))
        if "min" in spec or "max" in spec:
            exps.append(gxe.ExpectColumnValuesToBeBetween(column=name, min_value=spec.get("min"), max_value=spec.get("max")))
        if "values" in spec:
            exps.append(gxe.ExpectColumnValuesToBeInSet(column=name, value_set=list(spec["values"])))
        if spec.get("unique"):
            exps.append(gxe.ExpectColumnValuesToBeUnique(column=name))
    return exps


def import_gx() -> None:
    """GX takes seconds to import: started early, beside reading the data, it is ready when needed."""
    import great_expectations  # noqa: F401
    import great_expectations.expectations  # noqa: F401


_gx = threading.local()  # per thread: a GX context and the built suite, reused by every partition it checks


def _gx_validator(suite: dict):
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    key = json.dumps(suite, sort_keys=True, default=str)
    if getattr(_gx, "key", None) != key:
        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        batch_def = ctx.data_sources.add_pandas("raw").add_dataframe_asset("raw").add_batch_definition_whole_dataframe("all")
        _gx.key, _gx.batch_def = key, batch_def
        _gx.suite = gx.ExpectationSuite(name="trainflow", expectations=build_expectations(suite))
    return _gx.batch_def, _gx.suite


def run_suite(frame: pd.DataFrame, suite: dict) -> list[dict]:
    """Run the suite on a frame with GX; one plain dict per expectation."""
    batch_def, gx_suite = _gx_validator(suite)
    batch = batch_def.get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(gx_suite, result_format={"result_format": "COMPLETE", "partial_unexpected_count": SAMPLES})
    return [_summarize(r) for r in result.results]


def _exception_messages(info) -> list[str]:
    if isinstance(info, dict):
        if info.get("raised_exception"):
            return [str(info.get("exception_message"))]
        return [m for v in info.values() for m in _exception_messages(v)]
    return []


def _json_value(v):
    v = v.item() if hasattr(v, "item") else v  # numpy scalars
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v  # nan, inf are not JSON


def bound(kind: str, kwargs: dict) -> str:
    """What an expectation requires, in words, for the report."""
    if "min_value" in kwargs or "max_value" in kwargs:
        lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
        return f"between {lo} and {hi}" if lo is not None and hi is not None else f"≥ {lo}" if lo is not None else f"≤ {hi}"
    if "value_set" in kwargs:
        values = list(kwargs["value_set"])
        return f"one of {values[:8]}" + (f" (+{len(values) - 8} more)" if len(values) > 8 else "")
    if "type_list" in kwargs:
        return f"type in {kwargs['type_list']}"
    if "column_list" in kwargs:
        return f"the suite's {len(kwargs['column_list'])} columns, in order"
    if kind == "expect_column_values_to_not_be_null":
        mostly = kwargs.get("mostly")
        return "no nulls" if mostly in (None, 1, 1.0) else f"at most {1 - mostly:.1%} nulls"
    if kind == "expect_column_values_to_be_unique":
        return "unique"
    return ""


def _summarize(r) -> dict:
    cfg, res = r.expectation_config, r.result or {}
    out = {"expectation": cfg.type, "column": cfg.kwargs.get("column"), "success": bool(r.success),
           "bound": bound(cfg.type, cfg.kwargs)}
    if "unexpected_count" in res:
        out["unexpected_count"] = int(res["unexpected_count"])
        out["unexpected_percent"] = round(float(res.get("unexpected_percent") or 0.0), 4)
        out["sample_values"] = [_json_value(v) for v in res.get("partial_unexpected_list", [])[:SAMPLES]]
        out["sample_rows"] = [int(i) for i in res.get("partial_unexpected_index_list", [])[:SAMPLES]]
        # not reported ("_"): the failing rows (for quarantine) and the counts that partitions add up
        out["_rows"] = [int(i) for i in res.get("unexpected_index_list") or []]
        out["_n"], out["_missing"] = int(res.get("element_count") or 0), int(res.get("missing_count") or 0)
        out["_mostly"] = cfg.kwargs.get("mostly")
    if cfg.type == "expect_table_row_count_to_be_between":
        out["_bounds"] = [cfg.kwargs.get("min_value"), cfg.kwargs.get("max_value")]
    if "observed_value" in res:
        out["observed"] = res["observed_value"]
    errors = _exception_messages(r.exception_info)
    if errors:
        out["error"] = errors[0]
    return out


def describe_failure(f: dict, expected_columns: list[str]) -> str:
    where = f" column {f['column']}:" if f["column"] else ""
    line = f"  - {f['expectation']}{where}"
    if f["expectation"] == "expect_table_columns_to_match_ordered_list":
        seen = list(f.get("observed") or [])
        missing = [c for c in expected_columns if c not in seen]
        extra = [c for c in seen if c not in expected_columns]
        parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        if not parts:
            parts = [f"in another order: expected {expected_columns}, got {seen}"]
        return f"{line} columns differ from the suite: {'; '.join(parts)}"
    if "unexpected_count" in f:
        samples = ", ".join(f"row {i}: {v!r}" for i, v in zip(f["sample_rows"], f["sample_values"]))
        line += f" {f['unexpected_count']} rows ({f['unexpected_percent']:.2f}%) unexpected, e.g. {samples}"
    elif "observed" in f:
        line += f" observed {f['observed']}"
    if "error" in f:
        line += f" could not be evaluated: {f['error']}"
    return line


def non_numbers(frame: pd.DataFrame, suite: dict, offset: int = 0) -> dict:
    """For each numeric column that arrived as text: how many values are not numbers, and the first few."""
    found = {}
    for name, spec in suite["columns"].items():
        if spec["type"] in ("float", "int") and name in frame and frame[name].dtype == object:
            col = frame[name]
            bad = col[pd.to_numeric(col, errors="coerce").isna() & col.notna()]
            found[name] = {"type": spec["type"], "count": len(bad),
                           "samples": [[int(i) + offset, _json_value(v)] for i, v in bad.head(SAMPLES).items()]}
    return found


def describe_non_numbers(found: dict) -> list[str]:
    return [f"  column {name} should be {d['type']} but holds {d['count']} values that are not numbers, e.g. "
            + ", ".join(f"row {i}: {v!r}" for i, v in d["samples"]) for name, d in found.items()]


def root_causes(failed: list[dict], missing: set[str]) -> list[dict]:
    """Table-level failures first; for a missing or mistyped column, only that fact (not what it breaks)."""
    mistyped = {f["column"] for f in failed if f["expectation"] == "expect_column_values_to_be_in_type_list"}
    keep = [f for f in failed if f["column"] is None or (
        f["column"] not in missing and (f["column"] not in mistyped or f["expectation"] == "expect_column_values_to_be_in_type_list"))]
    return sorted(keep, key=lambda f: f["column"] is not None)


def markdown_report(report: dict) -> str:
    """The report as plain markdown: renders offline (GX's Data Docs load their assets from CDNs)."""
    d = report["data"]
    verdict = "PASSED" if report["success"] else "FAILED"
    rows = []
    for r in report["results"]:
        if "error" in r:
            observed = f"not evaluated: {r['error']}"
        elif "unexpected_count" in r:
            samples = ", ".join(f"row {i}: `{v!r}`" for i, v in zip(r["sample_rows"], r["sample_values"]))
            observed = f"{r['unexpected_count']:,} rows unexpected ({r['unexpected_percent']:.2f}%)" + (f"; {samples}" if samples else "")
        else:
            observed = _short(r.get("observed"))
        rows.append(f"| {'PASS' if r['success'] else 'FAIL'} | {r['expectation']} | {r['column'] or '(table)'} | {r.get('bound', '')} "
                    f"| {observed} |")
    return (f"# Validation {verdict}: {report['passed']} of {report['evaluated']} expectations "
            f"({report['pass_rate']:.1%})\n\n"
            f"- data: `{d['path']}`, {d['rows']:,} rows, sha256 `{d['sha256']}`\n- suite: `{report['suite']}`\n"
            f"- checked: {_checked(report['checked'])}\n"
            f"- rows: {report['rows']['clean']:,} clean + {report['rows']['quarantined']:,} quarantined = {report['rows']['input']:,}\n\n"
            "| result | expectation | column | required | observed |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
            + _drift_md(report["drift"]))


def _short(value) -> str:
    """An observed value for a table cell (a column list is long)."""
    if value is None:
        return ""
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return f"`{text[:80]}{'…' if len(text) > 80 else ''}`"


def _checked(c: dict) -> str:
    return "in memory, one GX validation" if c["mode"] == "in-memory" else f"per Dask partition ({c['partitions']}), results merged"


def _drift_md(drift: dict) -> str:
    if not drift["checked"]:
        return f"\n## Drift\nNot checked: {drift.get('reason', 'validation failed')}.\n"
    if not drift["columns"]:
        return f"\n## Drift\nNone beyond the bounds, against `{drift['reference']}`.\n"
    rows = "\n".join(f"| {c} | {d.get('mean_shift_std', '')} | {d.get('psi', '')} | {d.get('new_categories', '')} | "
                     f"{d.get('vanished_categories', '')} |" for c, d in drift["columns"].items())
    return (f"\n## Drift ({drift['policy']})\nAgainst `{drift['reference']}`:\n\n"
            "| column | mean shift (std) | PSI | new categories | vanished |\n|---|---|---|---|---|\n" + rows + "\n")


ROW_LEVEL = {"expect_column_values_to_not_be_null", "expect_column_values_to_be_between",
             "expect_column_values_to_be_in_set", "expect_column_values_to_be_unique"}


def row_reasons(failed: list[dict]) -> pd.Series:
    """Row index -> why it failed ('column: expectation; ...'), from the row-level failures."""
    reasons: dict[int, list[str]] = {}
    for f in failed:
        for i in f["_rows"]:
            reasons.setdefault(i, []).append(f"{f['column']}: {f['expectation']}")
    return pd.Series({i: "; ".join(r) for i, r in sorted(reasons.items())}, dtype=object)


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
    reference: dict | None  # columns of the last accepted data's statistics; None: not checked
    max_mean_shift: float
    max_psi: float


def quarantine_frame(rows: pd.DataFrame, reasons: pd.Series) -> pd.DataFrame:
    return rows.assign(_row=np.asarray(reasons.index, dtype=np.int64), _reason=reasons.to_numpy(dtype=object))


def validate(s: Settings) -> dict:
    cfg = s.validate_
    suite = load_suite(s.dataset.suite)
    raw = Path(s.ingest.out)
    if not raw.exists():
        raise UserError(f"validate: {raw} does not exist; run the ingest stage first (python -m tasks.ingest)")
    files = parquet_files(raw)
    try:
        n_rows = count_rows(files)
    except pa.ArrowException as e:
        raise UserError(f"validate: {raw} is not readable Parquet ({e}); rerun the ingest stage") from None
    reference = Path(cfg.reference)
    drift = Drift(json.loads(reference.read_text())["columns"] if cfg.drift != "off" and reference.exists() else None,
                  cfg.drift_max_mean_shift, cfg.drift_max_psi)
    partitioned = raw.is_dir() or n_rows > cfg.in_memory_max_rows
    # beside the checks, one read of the input copies it to the staged output (what is accepted when no
    # row is quarantined) and hashes it; GX is imported while the data is read if this process runs GX
    with staged_path(cfg.out) as out, ThreadPoolExecutor(2) as pool:
        digest = pool.submit(copy_and_hash, raw, out)
        if not partitioned or (s.dask.address == "local" and not s.dask.processes):
            pool.submit(import_gx)
        if partitioned:
            from tasks.validate_dask import Partitioned

            with dask_client(s.dask, "validate") as client:
                return check_and_write(cfg, s.dataset.suite, suite, raw, n_rows, out, digest, Partitioned(client, files, suite, cfg.partition_rows, drift))
        return check_and_write(cfg, s.dataset.suite, suite, raw, n_rows, out, digest, InMemory(files, suite, drift))


def check_and_write(cfg, suite_path: str, suite: dict, raw: Path, n_rows: int, out: Path, digest: Future, engine) -> dict:
    """Check with `engine` (in memory, or per Dask partition), decide, report, and write what was accepted."""
    results, text = engine.check()
    failed = [r for r in results if not r["success"]]

    # quarantine: row-level failures move aside; table-level ones (columns, types, row count) always stop
    table_level = [f for f in failed if f["expectation"] not in ROW_LEVEL or "error" in f]
    quarantining = cfg.on_failure == "quarantine" and bool(failed) and not table_level
    reasons = row_reasons(failed) if quarantining else pd.Series(dtype=object)
    n_clean = n_rows - len(reasons)
    enough = n_clean >= cfg.min_clean_fraction * n_rows
    success = not failed or (quarantining and enough)

    reference = Path(cfg.reference)
    check_drift = success and engine.drift.reference is not None
    report = {
        "success": success,
        "data": {"path": str(raw), "sha256": digest.result(), "rows": n_rows},
        "rows": {"input": n_rows, "clean": n_clean, "quarantined": len(reasons)},
        "suite": suite_path,
        "checked": {"mode": engine.mode, "partitions": engine.partitions},
        "evaluated": len(results),
        "passed": len(results) - len(failed),
        "pass_rate": round((len(results) - len(failed)) / len(results), 6),
        "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
        "drift": {"checked": check_drift, "policy": cfg.drift, "reference": str(reference), "columns": {},
                  "reason": None if check_drift else drift_skipped(cfg, success, reference)},
    }
    if failed and not success:
        write_reports(cfg, report)
        columns = next((r.get("observed") for r in results if r["expectation"] == "expect_table_columns_to_match_ordered_list"), None)
        causes = root_causes(failed, missing=set(suite["columns"]) - set(columns or suite["columns"]))
        lines = "\n".join([describe_failure(f, list(suite["columns"])) for f in causes] + describe_non_numbers(text))
        more = f"\n  ({len(failed) - len(causes)} more failed as a consequence; see the report)" if len(causes) < len(failed) else ""
        head = f"validate: {raw} failed {len(failed)} of {len(results)} expectations of {suite_path}"
        if quarantining:
            head = (f"validate: only {n_clean:,} of {n_rows:,} rows of {raw} pass ({n_clean / n_rows:.1%}), "
                    f"fewer than validate.min_clean_fraction={cfg.min_clean_fraction}")
        raise UserError(f"{head}:\n{lines}{more}\n"
                        f"Full report: {cfg.report}. Fix the data (dataset.source) or, if the data is right, the suite.")

    # accepted: the clean rows, the quarantined rows and the new reference are staged, then checked for drift
    with staged_path(cfg.quarantine) as quarantine:
        if len(reasons):
            remove(out)  # the copy of the input
        engine.write(out, reasons).to_parquet(quarantine, index=False)
        stats, drifted = engine.summarize(out)
        report["drift"]["columns"] = drifted
        if drifted:
            lines = "\n".join(describe(c, d, cfg.drift_max_mean_shift, cfg.drift_max_psi) for c, d in drifted.items())
            message = f"validate: {raw} drifted from the last accepted data ({reference}):\n{lines}\nFull report: {cfg.report_md}."
            if cfg.drift == "fail":
                report["success"] = False
                write_reports(cfg, report)
                raise UserError(f"{message} If the change is expected, accept it with one run at validate.drift: warn "
                                "(e.g. dvc exp run -S validate.drift=warn), which makes this data the new reference")
            log.warning(message)
        report["validated"] = {"path": cfg.out, "sha256": sha256_path(out) if len(reasons) else report["data"]["sha256"]}
    write_reports(cfg, report)
    write_json(reference, {"data_sha256": report["data"]["sha256"], "rows": n_clean, "columns": stats})
    if len(reasons):
        log.warning("validate: quarantined %d of %d rows (%s)", len(reasons), n_rows, cfg.quarantine)
    return {k: report[k] for k in ("success", "evaluated", "passed", "pass_rate", "rows", "checked")} | {"drift": drifted}


def drift_skipped(cfg, success: bool, reference: Path) -> str:
    if cfg.drift == "off":
        return "validate.drift is off"
    if not success:
        return "the data failed validation, so there is nothing accepted to compare"
    return f"no reference yet ({reference} is written from this run's data, the first accepted)"


def write_reports(cfg, report: dict) -> None:
    write_json(cfg.report, report)
    with atomic_path(cfg.report_md) as tmp:
        tmp.write_text(markdown_report(report))


if __name__ == "__main__":
    cli(validate)
