"""The expectation suite: a small reviewed YAML file (data/suites/*.yaml) built into a Great Expectations suite,
run on a pandas frame, one plain dict per expectation."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pandas as pd
import yaml

from tasks.errors import UserError
from tasks.validation.dtypes import NUMERIC, TYPES, as_utc, observed, type_ok, type_words, utc_timestamp

SAMPLES = 5
KEYS = ("type", "min", "max", "nulls", "values", "unique")
TYPE_CHECK = "expect_column_values_to_be_in_type_list"  # checked by tasks/validation/dtypes.py, reported as GX would
# the order of a report: table-level first, then per column in the suite's order
ORDER = [
    "expect_table_columns_to_match_ordered_list",
    "expect_table_row_count_to_be_between",
    TYPE_CHECK,
    "expect_column_values_to_not_be_null",
    "expect_column_values_to_be_between",
    "expect_column_values_to_be_in_set",
    "expect_column_values_to_be_unique",
]


def load_suite(path: str | Path) -> dict:
    path = Path(path)
    try:
        suite = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"dataset.suite: {path} does not exist; point dataset.suite at an expectation suite YAML") from None
    except yaml.YAMLError as e:  # a syntax error, or a tag such as !!python/object that safe_load refuses
        raise UserError(
            f"dataset.suite: {path} is not a plain YAML suite ({str(e).splitlines()[0]}); write it with plain "
            "mappings, lists and values only"
        ) from None
    if not isinstance(suite, dict) or not isinstance(suite.get("columns"), dict) or not suite["columns"]:
        raise UserError(f"dataset.suite: {path} must map 'columns' to {{name: {{type: ..., min: ..., max: ...}}}}")
    for name, spec in suite["columns"].items():
        spec = spec or {}
        unknown = set(spec) - set(KEYS)
        if unknown or spec.get("type") not in TYPES:
            raise UserError(
                f"dataset.suite: {path}: column {name}: type must be one of {TYPES} and keys among {', '.join(KEYS)} (got {spec})"
            )
        _check_bounds(path, name, spec)
    return suite


def _check_bounds(path: Path, name: str, spec: dict) -> None:
    """min and max: numbers for a numeric column, ISO 8601 timestamps for a datetime one."""
    for key in ("min", "max"):
        value = spec.get(key)
        if value is None:
            continue
        if spec["type"] == "datetime":
            try:
                utc_timestamp(str(value))
            except ValueError:
                raise UserError(
                    f"dataset.suite: {path}: column {name}: {key} {value!r} is not an ISO 8601 timestamp; "
                    "write it like '2013-01-01T00:00:00+00:00' (quoted)"
                ) from None
        elif spec["type"] in NUMERIC and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise UserError(f"dataset.suite: {path}: column {name}: {key} {value!r} must be a number (type {spec['type']})")


def build_expectations(suite: dict) -> list:
    """The suite's GX expectations (the type of each column is checked by check_types, beside them)."""
    import great_expectations.expectations as gxe

    cols = suite["columns"]
    exps: list = [gxe.ExpectTableColumnsToMatchOrderedList(column_list=list(cols))]
    if "row_count" in suite:
        rc = suite["row_count"]
        exps.append(gxe.ExpectTableRowCountToBeBetween(min_value=rc.get("min"), max_value=rc.get("max")))
    for name, spec in cols.items():
        exps.append(gxe.ExpectColumnValuesToNotBeNull(column=name, mostly=1 - spec.get("nulls", 0)))
        if "min" in spec or "max" in spec:
            lo, hi = spec.get("min"), spec.get("max")
            if spec["type"] == "datetime":
                lo, hi = (utc_timestamp(str(v)) if v is not None else None for v in (lo, hi))
            exps.append(gxe.ExpectColumnValuesToBeBetween(column=name, min_value=lo, max_value=hi))
        if "values" in spec:
            exps.append(gxe.ExpectColumnValuesToBeInSet(column=name, value_set=list(spec["values"])))
        if spec.get("unique"):
            exps.append(gxe.ExpectColumnValuesToBeUnique(column=name))
    return exps


def check_types(frame: pd.DataFrame, suite: dict) -> list[dict]:
    """Each column's type, one result per column in the shape of GX's (tasks/validation/dtypes.py says why)."""
    out = []
    for name, spec in suite["columns"].items():
        r = {"expectation": TYPE_CHECK, "column": name, "bound": type_words(spec["type"])}
        if name not in frame:
            out.append(r | {"success": False, "error": f"column {name} is not in the data"})
        else:
            out.append(r | {"success": type_ok(frame[name], spec["type"]), "observed": observed(frame[name])})
    return out


def for_gx(frame: pd.DataFrame, suite: dict) -> pd.DataFrame:
    """The frame as GX compares it with the suite's bounds: timestamp columns in UTC (the data is not changed)."""
    cols = suite["columns"]
    stamps = [n for n in cols if cols[n]["type"] == "datetime" and n in frame and frame[n].dtype.kind == "M"]
    return frame.assign(**{n: as_utc(frame[n]) for n in stamps}) if stamps else frame


def import_gx() -> None:
    """GX takes seconds to import: started early, beside reading the data, it is ready when needed."""
    import great_expectations
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
    """Run the suite on a frame (GX, and the type checks); one plain dict per expectation, in report order."""
    batch_def, gx_suite = _gx_validator(suite)
    batch = batch_def.get_batch(batch_parameters={"dataframe": for_gx(frame, suite)})
    result = batch.validate(gx_suite, result_format={"result_format": "COMPLETE", "partial_unexpected_count": SAMPLES})
    return in_report_order([_summarize(r) for r in result.results] + check_types(frame, suite), suite)


def in_report_order(results: list[dict], suite: dict) -> list[dict]:
    position = {name: i for i, name in enumerate(suite["columns"])}
    return sorted(results, key=lambda r: (position.get(r["column"], -1), ORDER.index(r["expectation"])))


def _exception_messages(info) -> list[str]:
    if isinstance(info, dict):
        if info.get("raised_exception"):
            return [str(info.get("exception_message"))]
        return [m for v in info.values() for m in _exception_messages(v)]
    return []


def json_value(v):
    if v is pd.NA:
        return None
    v = v.item() if hasattr(v, "item") else v  # numpy scalars
    if hasattr(v, "isoformat"):  # timestamps (and NaT)
        return v.isoformat()
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v  # nan, inf are not JSON


def bound(kind: str, kwargs: dict) -> str:
    """What an expectation requires, in words, for the report."""
    if "min_value" in kwargs or "max_value" in kwargs:
        lo, hi = (v.isoformat() if isinstance(v, pd.Timestamp) else v for v in (kwargs.get("min_value"), kwargs.get("max_value")))
        return f"between {lo} and {hi}" if lo is not None and hi is not None else f"≥ {lo}" if lo is not None else f"≤ {hi}"
    if "value_set" in kwargs:
        values = list(kwargs["value_set"])
        return f"one of {values[:8]}" + (f" (+{len(values) - 8} more)" if len(values) > 8 else "")
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
    out = {
        "expectation": cfg.type,
        "column": cfg.kwargs.get("column"),
        "success": bool(r.success),
        "bound": bound(cfg.type, cfg.kwargs),
    }
    if "unexpected_count" in res:
        out["unexpected_count"] = int(res["unexpected_count"])
        out["unexpected_percent"] = round(float(res.get("unexpected_percent") or 0.0), 4)
        out["sample_values"] = [json_value(v) for v in res.get("partial_unexpected_list", [])[:SAMPLES]]
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
