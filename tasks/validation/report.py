"""The validation report (JSON and markdown) and the failure message: each failed expectation with its column,
how many rows broke it and a few sample values with their row numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks.files import atomic_path, write_json
from tasks.validation.dtypes import NUMERIC
from tasks.validation.suite import SAMPLES, json_value


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
        if spec["type"] in NUMERIC and name in frame and frame[name].dtype == object:
            col = frame[name]
            bad = col[pd.to_numeric(col, errors="coerce").isna() & col.notna()]
            found[name] = {
                "type": spec["type"],
                "count": len(bad),
                "samples": [[int(i) + offset, json_value(v)] for i, v in bad.head(SAMPLES).items()],
            }
    return found


def describe_non_numbers(found: dict) -> list[str]:
    return [
        f"  column {name} should be {d['type']} but holds {d['count']} values that are not numbers, e.g. "
        + ", ".join(f"row {i}: {v!r}" for i, v in d["samples"])
        for name, d in found.items()
    ]


def root_causes(failed: list[dict], missing: set[str]) -> list[dict]:
    """Table-level failures first; for a missing or mistyped column, only that fact (not what it breaks)."""
    mistyped = {f["column"] for f in failed if f["expectation"] == "expect_column_values_to_be_in_type_list"}
    keep = [
        f
        for f in failed
        if f["column"] is None
        or (
            f["column"] not in missing
            and (f["column"] not in mistyped or f["expectation"] == "expect_column_values_to_be_in_type_list")
        )
    ]
    return sorted(keep, key=lambda f: f["column"] is not None)


def failure_message(head: str, results: list[dict], failed: list[dict], text: dict, suite: dict, report_path: str) -> str:
    """The one message a failed validation stops with: the root causes, one line each, and where the report is."""
    columns = next((r.get("observed") for r in results if r["expectation"] == "expect_table_columns_to_match_ordered_list"), None)
    causes = root_causes(failed, missing=set(suite["columns"]) - set(columns or suite["columns"]))
    lines = "\n".join([describe_failure(f, list(suite["columns"])) for f in causes] + describe_non_numbers(text))
    more = f"\n  ({len(failed) - len(causes)} more failed as a consequence; see the report)" if len(causes) < len(failed) else ""
    return (
        f"{head}:\n{lines}{more}\nFull report: {report_path}. Fix the data (dataset.source) or, if the data is right, the suite."
    )


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
            observed = f"{r['unexpected_count']:,} rows unexpected ({r['unexpected_percent']:.2f}%)" + (
                f"; {samples}" if samples else ""
            )
        else:
            observed = _short(r.get("observed"))
        rows.append(
            f"| {'PASS' if r['success'] else 'FAIL'} | {r['expectation']} | {r['column'] or '(table)'} | {r.get('bound', '')} "
            f"| {observed} |"
        )
    return (
        f"# Validation {verdict}: {report['passed']} of {report['evaluated']} expectations "
        f"({report['pass_rate']:.1%})\n\n"
        f"- data: `{d['path']}`, {d['rows']:,} rows, sha256 `{d['sha256']}`\n- suite: `{report['suite']}`\n"
        f"- checked: {_checked(report['checked'])}\n"
        f"- rows: {report['rows']['clean']:,} clean + {report['rows']['quarantined']:,} quarantined "
        f"= {report['rows']['input']:,}\n\n"
        "| result | expectation | column | required | observed |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
        + _drift_md(report["drift"])
    )


def _short(value) -> str:
    """An observed value for a table cell (a column list is long)."""
    if value is None:
        return ""
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return f"`{text[:80]}{'…' if len(text) > 80 else ''}`"


def _checked(c: dict) -> str:
    return (
        "in memory, one GX validation" if c["mode"] == "in-memory" else f"per Dask partition ({c['partitions']}), results merged"
    )


def _drift_md(drift: dict) -> str:
    if not drift["checked"]:
        return f"\n## Drift\nNot checked: {drift.get('reason', 'validation failed')}.\n"
    unchecked = drift.get("psi_not_computed") or []
    note = (
        f"\nPSI not computed for {', '.join(unchecked)}: the reference was written before bin fractions were stored "
        "(the mean shift is checked; this run's reference has them).\n"
        if unchecked
        else ""
    )
    if not drift["columns"]:
        return f"\n## Drift\nNone beyond the bounds, against `{drift['reference']}`.\n{note}"
    rows = "\n".join(
        f"| {c} | {d.get('mean_shift_std', '')} | {_psi(d)} | {d.get('new_categories', '')} | "
        f"{d.get('vanished_categories', '')} |"
        for c, d in drift["columns"].items()
    )
    return (
        f"\n## Drift ({drift['policy']})\nAgainst `{drift['reference']}`:\n\n"
        "| column | mean shift (std) | PSI | new categories | vanished |\n|---|---|---|---|---|\n" + rows + "\n" + note
    )


def _psi(d: dict) -> str:
    return "" if "psi" not in d else "not computed" if d["psi"] is None else str(d["psi"])


ROW_LEVEL = {
    "expect_column_values_to_not_be_null",
    "expect_column_values_to_be_between",
    "expect_column_values_to_be_in_set",
    "expect_column_values_to_be_unique",
}


def row_reasons(failed: list[dict]) -> pd.Series:
    """Row index -> why it failed ('column: expectation; ...'), from the row-level failures."""
    reasons: dict[int, list[str]] = {}
    for f in failed:
        for i in f["_rows"]:
            reasons.setdefault(i, []).append(f"{f['column']}: {f['expectation']}")
    return pd.Series({i: "; ".join(r) for i, r in sorted(reasons.items())}, dtype=object)


def quarantine_frame(rows: pd.DataFrame, reasons: pd.Series) -> pd.DataFrame:
    return rows.assign(_row=np.asarray(reasons.index, dtype=np.int64), _reason=reasons.to_numpy(dtype=object))


def drift_skipped(cfg, success: bool, why: str) -> str:
    if cfg.drift == "off":
        return "validate.drift is off"
    if not success:
        return "the data failed validation, so there is nothing accepted to compare"
    return why


def write_reports(cfg, report: dict) -> None:
    write_json(cfg.report, report)
    with atomic_path(cfg.report_md) as tmp:
        tmp.write_text(markdown_report(report))
