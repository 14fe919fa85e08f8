"""Draft a dataset section and its expectation suite from a CSV or Parquet file, for a person to review.
Run: trainflow dataset new FILE --target COL   (or python -m tasks.draft FILE --target COL)

The file is read as the pipeline will read it: a CSV whole, with ingest's reader; a Parquet file's rows
counted from its metadata, and above SAMPLE_ROWS rows an evenly spread sample of its record batches for the
decisions, while one streaming pass over every row gives the exact bounds, null counts and value sets the
suite holds. It decides:
- each column's kind: datetime (timestamps, and text that parses as dates), categorical (text, true/false,
  integers with at most LOW_CARDINALITY values), ignore (a single value; identifier-like: unique or nearly
  unique text or integers, or integers that increase with every row; each one warned about), else numeric;
- the task (auto): 2 labels binary; text, or integers with at most NUMERIC_LABELS labels (and at most 5% of
  the rows distinct), multiclass (at most MAX_CLASSES labels); other numbers regression;
- the key: the smallest set of up to 3 columns (no floats, no nulls; identifier columns first) unique in the
  rows read, else [] (the split then hashes the feature columns);
- slices: up to 2 categorical columns of 2 to 20 values (text first);
- the suite: every column in order with its type, min/max widened by MARGIN of their range (dates to whole
  days), nulls with room to spare, the values of low-cardinality text and of a classification target, and
  row_count from half to 100 times the rows.
It writes data/datasets/NAME.yaml and data/suites/NAME.yaml under the working directory (the project
root), each through a temporary file renamed into place, never over an existing file without --force.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import UserError
from tasks.files import atomic_path, sha256_file
from tasks.settings import MAX_CLASSES
from tasks.tables import as_validated
from tasks.validation.dtypes import NUMERIC, type_ok

SAMPLE_ROWS = 1_000_000  # rows read for the decisions (kinds, key); bounds and counts come from every row
BATCH_ROWS = 65_536
LOW_CARDINALITY = 10  # integers with at most this many values are categorical
NUMERIC_LABELS = 20  # a numeric target with more distinct values is a regression target
SLICE_VALUES = 20  # a slice column has 2 to this many values
VALUES_MAX = 50  # text with at most this many values gets `values:` in the suite
NEARLY_UNIQUE = 0.95  # distinct / non-null values of an identifier-like column
MIN_DISTINCT_ID = 20  # fewer distinct values than this is never an identifier
MARGIN = 0.1  # of the observed range, added below the minimum and above the maximum
KEY_CANDIDATES = 10
DATE_TEXT = re.compile(  # ISO 8601 dates and times, or month/day/year
    r"\d{4}-\d{1,2}-\d{1,2}([T ]\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?"
    r"|\d{1,2}/\d{1,2}/\d{4}( \d{1,2}:\d{2}(:\d{2})?)?"
)


@dataclass
class Facts:
    """What every row of a column says: missing values, smallest and largest, distinct values (up to a cap)."""

    nulls: int = 0
    lo: Any = None
    hi: Any = None
    values: set | None = field(default_factory=set)  # None: more than MAX_CLASSES
    infinite: bool = False  # a float column holding inf or -inf: no bounds are drafted


@dataclass
class Table:
    sample: pd.DataFrame  # the rows the decisions are made on (all of them up to SAMPLE_ROWS)
    rows: int  # every row of the file
    facts: dict[str, Facts]
    sha256: str


@dataclass
class Column:
    name: str
    type: str  # in the suite
    kind: str  # in dataset.columns ("target" for the target)
    why: str
    distinct: int  # in the sample


@dataclass
class Draft:
    dataset: dict
    suite: dict
    columns: list[Column]
    why: dict  # task, key, slices: the reasons, for the summary and the header
    warnings: list[str]
    rows: int
    sampled: int


# ---- reading ---------------------------------------------------------------------------------------------


def column_facts(frame: pd.DataFrame) -> dict[str, Facts]:
    out = {}
    for name, col in frame.items():
        present = col.dropna()
        ordered = col.dtype.kind in "iufM" and len(present) > 0
        infinite = col.dtype.kind == "f" and bool(np.isinf(present.to_numpy(dtype=np.float64)).any())
        values = present.unique()
        out[name] = Facts(
            nulls=len(col) - len(present),
            lo=present.min() if ordered else None,
            hi=present.max() if ordered else None,
            values=set(values.tolist()) if len(values) <= MAX_CLASSES else None,
            infinite=infinite,
        )
    return out


def merge_facts(a: dict[str, Facts], b: dict[str, Facts]) -> dict[str, Facts]:
    if not a:
        return b
    out = {}
    for name, x in a.items():
        y = b[name]
        values = x.values | y.values if x.values is not None and y.values is not None else None
        out[name] = Facts(
            nulls=x.nulls + y.nulls,
            lo=min((v for v in (x.lo, y.lo) if v is not None), default=None),
            hi=max((v for v in (x.hi, y.hi) if v is not None), default=None),
            values=values if values is not None and len(values) <= MAX_CLASSES else None,
            infinite=x.infinite or y.infinite,
        )
    return out


def read_parquet(path: Path) -> Table:
    try:
        f = pq.ParquetFile(path)
        rows = f.metadata.num_rows
        if rows <= SAMPLE_ROWS:
            frame = as_validated(f.read().to_pandas())
            return Table(frame, rows, column_facts(frame), sha256_file(path))
        step, kept = math.ceil(rows / SAMPLE_ROWS), []
        facts: dict[str, Facts] = {}
        for i, batch in enumerate(f.iter_batches(batch_size=BATCH_ROWS)):
            part = as_validated(pa.Table.from_batches([batch], schema=f.schema_arrow).to_pandas())
            facts = merge_facts(facts, column_facts(part))
            if i % step == 0:  # an evenly spread sample of whole batches
                kept.append(part)
    except pa.ArrowException as e:
        raise UserError(f"{path} is not readable Parquet ({e}); re-export it") from None
    return Table(pd.concat(kept, ignore_index=True), rows, facts, sha256_file(path))


def read_file(path: Path) -> Table:
    """The file as the validate stage will see it (CSV through ingest's reader, Parquet as it is)."""
    if not path.is_file():
        raise UserError(f"{path} is not a file; give a CSV or Parquet file")
    with open(path, "rb") as f:
        parquet = f.read(4) == b"PAR1"
    if parquet:
        return read_parquet(path)
    from tasks.ingest import read_table

    frame, digest = read_table(str(path))
    frame = as_validated(frame)
    step = math.ceil(len(frame) / SAMPLE_ROWS)
    return Table(frame.iloc[::step].reset_index(drop=True), len(frame), column_facts(frame), digest)


# ---- deciding --------------------------------------------------------------------------------------------


def suite_type(name: str, col: pd.Series) -> str:
    for kind in ("bool", "int", "float", "datetime", "str"):
        if type_ok(col, kind):
            return kind
    raise UserError(
        f"column {name} holds {col.dtype} values; Trainflow takes numbers, true/false, text and timestamps: "
        "convert the column (or drop it) and draft again"
    )


def looks_like_dates(col: pd.Series) -> str | None:
    """An example value when every distinct value (of up to 1,000) is date text that pandas parses, else None."""
    values = pd.Series(col.dropna().unique()[:1000])
    if not len(values) or not values.map(lambda v: isinstance(v, str) and DATE_TEXT.fullmatch(v) is not None).all():
        return None
    parsed = pd.to_datetime(values, utc=True, errors="coerce")  # as tasks/features.py expands datetimes
    return str(values.iloc[0]) if parsed.notna().all() else None


def identifier(col: pd.Series, distinct: int) -> str | None:
    """Why the column looks like an identifier, or None."""
    present = col.dropna()
    if distinct < MIN_DISTINCT_ID:
        return None
    if col.dtype.kind in "iu" and present.is_monotonic_increasing and present.is_unique:
        return "integers that increase with every row (a row number)"
    if distinct >= NEARLY_UNIQUE * len(present):
        share = "unique" if distinct == len(present) else f"{distinct / len(present):.1%} distinct"
        return f"identifier-like: {distinct:,} distinct values in {len(present):,} rows ({share})"
    return None


def column_kind(name: str, col: pd.Series, kind: str) -> Column:
    distinct = int(col.nunique())
    if kind == "datetime":
        return Column(name, kind, "datetime", "timestamps", distinct)
    if distinct <= 1:
        shown = repr(_plain(col.dropna().iloc[0])) if distinct else "all missing"
        return Column(name, kind, "ignore", f"a single value ({shown}): nothing to learn from", distinct)
    if kind == "bool":
        return Column(name, kind, "categorical", "true/false", distinct)
    example = looks_like_dates(col) if kind == "str" else None
    if example:
        return Column(name, kind, "datetime", f"text that parses as dates (e.g. {example!r})", distinct)
    why = identifier(col, distinct) if kind in ("str", "int") else None
    if why:
        return Column(name, kind, "ignore", why, distinct)
    if kind == "str":
        return Column(name, kind, "categorical", f"text, {distinct:,} distinct values", distinct)
    if kind == "int" and distinct <= LOW_CARDINALITY:
        return Column(name, kind, "categorical", f"integer codes, {distinct} distinct values", distinct)
    return Column(name, kind, "numeric", f"{'integers' if kind == 'int' else 'numbers'}, {distinct:,} distinct values", distinct)


def target_task(table: Table, target: Column, asked: str) -> tuple[str, str]:
    """The task for the target (asked, or decided from its labels) and why."""
    facts = table.facts[target.name]
    labels = _sorted(facts.values) if facts.values is not None else None
    n = len(labels) if labels is not None else MAX_CLASSES + 1
    shown = f"{n:,} distinct values" if labels is None or n > 5 else f"{n} labels {[_plain(v) for v in labels]}"
    numeric = target.type in NUMERIC
    integral = labels is not None and all(float(v).is_integer() for v in labels) if numeric else False
    if n < 2 or target.type == "datetime":
        raise UserError(f"target {target.name} is {target.type} with {shown}; choose a column with something to predict")
    fits = {
        "binary": n == 2,
        "multiclass": n <= MAX_CLASSES,
        "regression": numeric and target.type != "bool",
    }
    if asked != "auto":
        if not fits[asked]:
            raise UserError(
                f"--task {asked} does not fit target {target.name} ({target.type}, {shown}); "
                f"binary needs 2 labels, multiclass at most {MAX_CLASSES:,}, regression numbers"
            )
        return asked, f"as asked ({target.type}, {shown})"
    if n == 2:
        return "binary", shown
    if not numeric and fits["multiclass"]:
        return "multiclass", f"text with {shown}"
    if integral and n <= NUMERIC_LABELS and n <= 0.05 * len(table.sample):
        return "multiclass", f"integers with {shown}; pass --task regression if they are amounts"
    if numeric:
        return "regression", f"numbers, {shown}"
    raise UserError(f"target {target.name} is text with more than {MAX_CLASSES:,} labels (MAX_CLASSES); choose another target")


def propose_key(sample: pd.DataFrame, columns: list[Column]) -> tuple[list[str], str]:
    """The smallest set of up to 3 columns unique in the sample: identifier columns first, then by distinct values."""
    candidates = [
        c
        for c in columns
        if c.kind != "target" and c.type not in ("float", "bool") and c.distinct > 1 and not sample[c.name].isna().any()
    ]
    candidates.sort(key=lambda c: (c.kind != "ignore", -c.distinct))
    candidates = candidates[:KEY_CANDIDATES]
    codes = {c.name: pd.factorize(sample[c.name])[0].astype(np.int64) for c in candidates}
    n = len(sample)
    for size in (1, 2, 3):
        for combo in combinations(candidates, size):
            if math.prod(c.distinct for c in combo) < n:
                continue
            code = np.zeros(n, dtype=np.int64)
            for c in combo:
                code = code * c.distinct + codes[c.name]
            if pd.Series(code).is_unique:
                return [c.name for c in combo], f"unique in the {n:,} rows read"
    return [], (
        f"no set of up to 3 columns (without floats or nulls) is unique in the {n:,} rows read; the split will "
        "hash the feature columns (rows with equal features share a split)"
    )


def pick_slices(columns: list[Column]) -> list[str]:
    fit = [c for c in columns if c.kind == "categorical" and 2 <= c.distinct <= SLICE_VALUES]
    fit.sort(key=lambda c: {"str": 0, "bool": 1}.get(c.type, 2))  # stable: file order within each
    return [c.name for c in fit[:2]]


# ---- the suite -------------------------------------------------------------------------------------------


def _nice(x: float, step: float, up: bool) -> float:
    """x rounded outward to a multiple of step (a power of ten), without float noise."""
    digits = max(0, -math.floor(math.log10(step)))
    return round((math.ceil if up else math.floor)(x / step) * step, digits)


def widen(lo, hi, kind: str) -> tuple:
    """The observed range widened by MARGIN on each side (not below 0 for a column that never is)."""
    if kind == "datetime":
        lo, hi = pd.Timestamp(lo), pd.Timestamp(hi)
        pad = (hi - lo) * MARGIN if hi > lo else pd.Timedelta(days=1)
        return (lo - pad).floor("D").isoformat(), (hi + pad).ceil("D").isoformat()
    lo, hi = float(lo), float(hi)
    span = hi - lo if hi > lo else max(abs(hi) * 0.1, 10.0)  # one value: 1% of it (at least 1) on each side
    a, b = lo - MARGIN * span, hi + MARGIN * span
    if lo >= 0 > a:
        a = 0.0
    if kind.startswith(("int", "uint")):
        return math.floor(a), math.ceil(b)
    step = 10.0 ** (math.floor(math.log10(span)) - 2)
    return _nice(a, step, up=False), _nice(b, step, up=True)


def column_spec(c: Column, facts: Facts, rows: int, labels: bool, unique: bool) -> dict:
    spec: dict = {"type": c.type}
    if facts.lo is not None and not facts.infinite and c.type in NUMERIC + ["datetime"]:
        spec["min"], spec["max"] = widen(facts.lo, facts.hi, c.type)
    if facts.nulls:
        share = facts.nulls / rows
        spec["nulls"] = min(1.0, math.ceil(max(share * 1.5, share + 0.005) * 1000) / 1000)
    values = _sorted(facts.values) if facts.values is not None else None
    if values is not None and (labels or (c.type == "str" and c.kind == "categorical" and len(values) <= VALUES_MAX)):
        spec["values"] = [_plain(v) for v in values]
    if unique:
        spec["unique"] = True
    return spec


def _sorted(values: set) -> list:
    try:
        return sorted(values)
    except TypeError:  # mixed types
        return sorted(values, key=str)


def _plain(v):
    """A numpy or pandas scalar as the plain Python value YAML writes."""
    v = v.item() if hasattr(v, "item") else v
    return v.isoformat() if hasattr(v, "isoformat") else v


# ---- writing ---------------------------------------------------------------------------------------------

PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]*")
# plain words that YAML 1.1 (PyYAML) or 1.2 (ruamel, DVC) reads as something else than text
RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "nan", "inf"}


def scalar(v) -> str:
    """One value as YAML text that reads back as the same value with yaml.safe_load (and YAML 1.2 loaders):
    text is quoted unless it is a plain word no YAML takes for a boolean, a number, null or a date."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return ".nan" if math.isnan(v) else ".inf" if v > 0 else "-.inf"
        text = repr(v)
        mantissa, _, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if exponent and "." not in mantissa else text  # 1e-05 is text to YAML 1.1
    text = str(v)
    if PLAIN.fullmatch(text) and text.lower() not in RESERVED:
        return text
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def flow(value) -> str:
    """A value in YAML flow style: {a: 1, b: [x, y]}."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{scalar(k)}: {flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    return scalar(value)


def comment(text: str) -> str:
    return " ".join(str(text).splitlines())  # one line


def read_from(d: Draft) -> str:
    if d.sampled == d.rows:
        return "decided on all rows"
    return f"decided on an evenly spread sample of {d.sampled:,} rows; bounds, nulls and values from every row"


def dataset_yaml(d: Draft) -> str:
    x = d.dataset
    ignored = [c.name for c in d.columns if c.kind == "ignore"]
    header = [
        f"Drafted by `trainflow dataset new` from {x['source']} ({d.rows:,} rows x {len(d.columns)} columns; {read_from(d)}).",
        "Review before training; each guess has its reason beside it:",
        f"- the task: {x['task']} ({d.why['task']});",
        f"- each column's kind (ignored: {', '.join(ignored) or 'none'}); a column known only after the target, or",
        "  computed from it, would leak it: set it to ignore;",
        f"- the key: {d.why['key']};",
        f"- the slices ({d.why['slices']}), and the suite {x['suite']} (bounds: the data's own, widened by {MARGIN:.0%}).",
    ]
    lines = [f"# {comment(h)}".replace("dataset:", "dataset :") for h in header] + ["dataset:"]
    lines += [f"  {k}: {scalar(x[k])}" for k in ("name", "source", "sha256", "suite", "task", "target", "target_transform")]
    lines.append(f"  key: {flow(x['key'])}")
    features = [c for c in d.columns if c.kind != "target"]
    width = max((len(scalar(c.name)) for c in features), default=0) + 1
    lines.append("  columns:" if features else "  columns: {}")
    lines += [f"    {scalar(c.name) + ':':<{width}} {c.kind:<11}  # {comment(c.why)}" for c in features]
    lines.append(f"  slices: {flow(x['slices'])}")
    return "\n".join(lines) + "\n"


def suite_yaml(d: Draft) -> str:
    x, suite = d.dataset, d.suite
    header = [
        f"Expectations drafted by `trainflow dataset new` from {x['source']} ({d.rows:,} rows; {read_from(d)}).",
        "Reviewed like code. columns: every column, in order, with its type (float, int, bool, str, datetime, or a",
        "width: int8 ... uint64, float32, float64), min / max (inclusive; timestamps as ISO 8601 text), nulls (the",
        "largest allowed fraction of missing values; default 0), values (the allowed ones) and unique: true.",
    ]
    width = max(len(scalar(n)) for n in suite["columns"]) + 1
    lines = [f"# {comment(h)}" for h in header] + [f"row_count: {flow(suite['row_count'])}", "columns:"]
    for c in d.columns:
        note = f"  # target ({x['task']})" if c.kind == "target" else ""
        lines.append(f"  {scalar(c.name) + ':':<{width}} {flow(suite['columns'][c.name])}{note}")
    return "\n".join(lines) + "\n"


# ---- the command -----------------------------------------------------------------------------------------


def default_name(path: Path) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", path.name.split(".")[0].lower()).strip("_") or "dataset"


def source_text(path: Path) -> str:
    """The file as dataset.source: relative to the project root (the working directory) when inside it."""
    full, root = path.resolve(), Path.cwd().resolve()
    return full.relative_to(root).as_posix() if full.is_relative_to(root) else str(full)


def outputs(name: str) -> tuple[Path, Path]:
    return Path("data/datasets") / f"{name}.yaml", Path("data/suites") / f"{name}.yaml"


def decide(table: Table, target: str, asked: str) -> tuple[list[Column], str, str]:
    """Every column's type and kind, in file order (the target's kind is "target"); the task and why."""
    if target not in table.sample:
        raise UserError(f"--target {target}: no such column; the columns are {list(table.sample.columns)}")
    columns = []
    for name, col in table.sample.items():
        kind = suite_type(str(name), col)
        if name == target:
            columns.append(Column(target, kind, "target", "", int(col.nunique())))
        else:
            columns.append(column_kind(str(name), col, kind))
    task, why = target_task(table, next(c for c in columns if c.kind == "target"), asked)
    return columns, task, why


def draft(path: Path, target: str, name: str, asked: str = "auto") -> Draft:
    """The dataset section and the suite drafted from the file, with the reasons (nothing is written)."""
    from tasks.settings import DatasetSettings

    table = read_file(path)
    columns, task, task_why = decide(table, target, asked)
    key, key_why = propose_key(table.sample, columns)
    slices = pick_slices(columns)
    dataset_path, suite_path = outputs(name)
    dataset = {
        "name": name,
        "source": source_text(path),
        "sha256": table.sha256,
        "suite": suite_path.as_posix(),
        "task": task,
        "target": target,
        "target_transform": "none",
        "key": key,
        "columns": {c.name: c.kind for c in columns if c.kind != "target"},
        "slices": slices,
    }
    DatasetSettings.model_validate(dataset)  # what `trainflow use` checks: a failure here is a bug of this module
    whole = len(table.sample) == table.rows
    suite = {
        "row_count": {"min": max(1, table.rows // 2), "max": table.rows * 100},
        "columns": {
            c.name: column_spec(
                c,
                table.facts[c.name],
                table.rows,
                labels=c.kind == "target" and task != "regression",
                unique=whole and key == [c.name],
            )
            for c in columns
        },
    }
    warnings = [
        f"column {c.name} is set to ignore: {c.why}; if it is a feature, give it a kind in {dataset_path}"
        for c in columns
        if c.kind == "ignore"
    ]
    slices_why = f"{', '.join(slices)}: categorical, 2 to {SLICE_VALUES} values" if slices else "none: no categorical column fits"
    why = {"task": task_why, "key": f"{key} ({key_why})" if key else f"[] ({key_why})", "slices": slices_why}
    return Draft(dataset, suite, columns, why, warnings, table.rows, len(table.sample))


def write(d: Draft, force: bool) -> tuple[Path, Path]:
    paths = outputs(d.dataset["name"])
    if not force:
        refuse_existing(paths)
    for path, text in zip(paths, (dataset_yaml(d), suite_yaml(d))):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return paths


def refuse_existing(paths: tuple[Path, Path]) -> None:
    for path in paths:
        if path.exists():
            raise UserError(f"{path} exists; pass --force to replace it (or --name to draft under another name)")


def summary(d: Draft, paths: tuple[Path, Path]) -> str:
    from tasks.datasets import DATASETS

    x = d.dataset
    counts = pd.Series([c.kind for c in d.columns if c.kind != "target"]).value_counts()
    width = max(len(c.name) for c in d.columns)
    lines = [
        f"Drafted {x['name']} from {x['source']}: {d.rows:,} rows, {len(d.columns)} columns ({read_from(d)}).",
        f"  task: {x['task']} on {x['target']} ({d.why['task']})",
        "  columns: " + ", ".join(f"{n} {k}" for k, n in counts.items()),
    ]
    lines += [f"    {c.name:<{width}}  {c.kind:<11}  {c.why}" for c in d.columns if c.kind != "target"]
    lines += [f"  key: {d.why['key']}", f"  slices: {d.why['slices']}"]
    lines += [f"Wrote {paths[0]} and {paths[1]}."]
    lines += [
        "Review them before training: the task; each column's kind (set to ignore any column known only after "
        "the target, which would leak it); the key; the slices; the suite's bounds (the data's own, widened)."
    ]
    same = paths[0].parent.resolve() in (DATASETS.resolve(), (Path.cwd() / "data" / "datasets").resolve())
    lines += [f"Next: trainflow use {x['name'] if same else paths[0]}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m tasks.draft",
        description="Draft data/datasets/NAME.yaml and data/suites/NAME.yaml from a CSV or Parquet file, to review.",
        epilog="The same command: `trainflow dataset new FILE --target COL`. Run it from the project root.",
    )
    ap.add_argument("file", help="a CSV or Parquet file")
    ap.add_argument("--target", required=True, help="the column to predict")
    ap.add_argument("--name", help="the dataset's name (default: the file's name)")
    ap.add_argument("--task", default="auto", choices=["auto", "regression", "binary", "multiclass"])
    ap.add_argument("--force", action="store_true", help="replace existing files of that name")
    a = ap.parse_args(argv)
    path = Path(a.file)
    name = a.name or default_name(path)
    try:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            raise UserError(f"--name {name!r}: use letters, digits, _ and - (it names the files data/datasets/NAME.yaml)")
        if not a.force:
            refuse_existing(outputs(name))
        d = draft(path, a.target, name, a.task)
        paths = write(d, a.force)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for w in d.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(summary(d, paths))


if __name__ == "__main__":
    main()
