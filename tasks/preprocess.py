"""Split, clean and encode the validated data on Dask; write Parquet splits and the fitted transform.
Run: python -m tasks.preprocess

- Split: each row goes to train/val/test by a hash of its key columns (dataset.key; the whole row when
  empty), so a rerun, or a rerun after rows are appended, keeps every row in the split it was in.
- Rows without a target are left out and counted (schema.json: dropped_missing_target).
- The transform (tasks/features.py: imputation with missing indicators, scaling, categorical vocabularies,
  datetime parts) is fitted on the train split only, in one Dask pass, and saved as transform.json, which
  the package stage and inference reuse.
- Output (`preprocess.out_dir`): train/, val/, test/ (model inputs + target, float32, files of about
  `preprocess.partition_rows` rows), test_raw/ (the same test rows as they came, for package checks),
  transform.json, and schema.json (feature names, categorical columns, row counts) that train reads
  instead of scanning the data.
Runs on the local cluster or on an existing scheduler (dask.address); the output is the same.
"""

from __future__ import annotations

import json
import logging
import shutil
from functools import partial
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.cluster import dask_client, gather, show_progress
from tasks.features import (  # noqa: F401 (apply_transform: re-exported)
    LOWEST,
    SPLITS,
    apply_transform,
    assign_split,
    categorical_features,
    encode,
    encode_target,
    expand,
    fit,
    label_text,
    merge_stats,
    numeric_names,
    split_codes,
    train_stats,
)
from tasks.files import atomic_dir, sha256_path, write_json
from tasks.parent import reused_transform
from tasks.settings import MAX_CLASSES, Settings, UserError, cli
from tasks.tables import Piece, count_rows, parquet_files, pieces

log = logging.getLogger(__name__)


def check_validated(s: Settings) -> None:
    """Refuse data that the validate stage has not passed (or that changed since)."""
    report = Path(s.validate_.report)
    if not report.exists():
        raise UserError(f"preprocess: no validation report at {report}; run the validate stage first")
    r = json.loads(report.read_text())
    if not r.get("success"):
        raise UserError(f"preprocess: {s.ingest.out} failed validation (see {report}); fix the data and rerun validate")
    if not Path(s.validate_.out).exists() or r.get("validated", {}).get("sha256") != sha256_path(s.validate_.out):
        raise UserError(f"preprocess: {s.validate_.out} is missing or changed after validation; rerun the validate stage")


def check_columns(s: Settings, files: list[Path]) -> pa.Schema:
    """The data's columns against dataset.columns and dataset.target, before any work starts."""
    d, data = s.dataset, s.validate_.out
    schema = pq.read_schema(files[0])
    names = schema.names
    if d.target not in names:
        raise UserError(f"dataset.target: column {d.target!r} is not in {data} (columns: {names}); set dataset.target")
    missing = [c for c in d.columns if c not in names]
    if missing:
        raise UserError(
            f"dataset.columns: {missing} are not in {data} (columns: {names}); remove them from dataset.columns or fix the data"
        )
    undeclared = [c for c in names if c not in d.columns and c != d.target]
    if undeclared:
        raise UserError(
            f"dataset.columns: {data} has columns {undeclared} that dataset.columns does not declare; "
            "add each as numeric, categorical, datetime or ignore"
        )
    for c, kind in d.columns.items():
        t = schema.field(c).type
        if kind == "numeric" and not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            col = pq.read_table(files[0], columns=[c]).column(c).to_pandas()
            bad = col[pd.to_numeric(col, errors="coerce").isna() & col.notna()]
            sample = f" (e.g. {bad.iloc[0]!r} in row {bad.index[0]})" if len(bad) else ""
            what = "text" if pa.types.is_string(t) or pa.types.is_large_string(t) else f"{t} values"
            raise UserError(
                f"dataset.columns: column {c!r} is declared numeric but holds {what}{sample}; "
                "declare it categorical, or fix the data"
            )
    t = schema.field(d.target).type
    if d.task == "regression" and not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise UserError(
            f"dataset.target: column {d.target!r} holds {t} values; a regression target must be numeric "
            "(for labels set dataset.task: binary or multiclass)"
        )
    if d.task != "regression" and pa.types.is_nested(t):
        raise UserError(f"dataset.target: column {d.target!r} holds {t} values; labels must be text, numbers or booleans")
    return schema


def label_dtype(t: pa.DataType) -> str:
    """How a label is written back in predictions: as the target column's type."""
    return (
        "bool" if pa.types.is_boolean(t) else "int" if pa.types.is_integer(t) else "float" if pa.types.is_floating(t) else "str"
    )


def check_target(counts: dict, d, lowest: tuple[float, str] | None) -> list[str]:
    """The target across the splits, before the transform is fitted: classification's classes (the train
    split's labels, sorted), each in every split and none only outside train; a transformed regression target
    in the transform's domain. `counts`: {split: {label: rows}} (regression: {split: {"invalid": rows}})."""
    if d.task == "regression":
        bad = sum(c.get("invalid", 0) for c in counts.values())
        if bad and lowest is not None:
            raise UserError(
                f"dataset.target_transform={d.target_transform}: {bad:,} rows of {d.target!r} are not {lowest[1]} "
                f"(the transform is undefined there); use log1p for a target ≥ 0, none, or fix the data"
            )
        return []
    train = counts.get("train", {})
    classes = sorted(train, key=_natural)
    if len(classes) > MAX_CLASSES:
        raise UserError(
            f"dataset.task={d.task}: {d.target!r} has {len(classes):,} distinct values in the train split, more than "
            f"{MAX_CLASSES:,} classes: it looks like a number to predict; set dataset.task: regression"
        )
    if len(classes) < 2:
        raise UserError(
            f"dataset.task={d.task}: {d.target!r} has one class in the train split ({classes}); a classifier needs "
            "two or more: check dataset.target and the data"
        )
    if d.task == "binary" and len(classes) != 2:
        raise UserError(
            f"dataset.task=binary: {d.target!r} has {len(classes)} classes in the train split "
            f"({classes[:10]}{' …' if len(classes) > 10 else ''}); set dataset.task: multiclass"
        )
    for split in ("val", "test"):
        unseen = {k: n for k, n in counts.get(split, {}).items() if k not in train}
        if unseen:
            shown = ", ".join(f"{k!r} ({n:,} rows)" for k, n in sorted(unseen.items())[:10])
            raise UserError(
                f"dataset.target: the {split} split has labels the train split lacks: {shown}; the model could never "
                "predict them. Give more rows of those labels, or drop or merge them in the data"
            )
    absent = {split: [c for c in classes if not counts.get(split, {}).get(c)] for split in ("val", "test")}
    if any(absent.values()):
        split, missing = next((k, v) for k, v in absent.items() if v)
        shown = ", ".join(f"{c!r} (train {train[c]:,})" for c in missing[:10])
        raise UserError(
            f"dataset.target: the {split} split has no rows of {shown}; every class must be in every split to be "
            "validated and scored. Give more rows of those classes, merge rare classes, or raise preprocess.split."
            f"{split}"
        )
    return classes


def _natural(label: str) -> tuple:
    """Labels in number order when they are numbers (2 before 10), else in text order."""
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)


def _encoded(part: pd.DataFrame, transform: dict) -> pd.DataFrame:
    frame = pd.DataFrame(encode(transform, part), columns=transform["features"], index=part.index)
    frame[transform["target"]] = encode_target(transform, part[transform["target"]])
    frame["split"] = part["split"]
    return frame


def _expanded(part: pd.DataFrame, kinds: dict, target: str, task: str) -> pd.DataFrame:
    y = part[target].astype("float64") if task == "regression" else label_text(part[target])
    return expand(part, kinds).assign(**{target: y, "split": part["split"]})


def _null_count(files: list[Path], column: str) -> int | None:
    """Missing values of a column from the Parquet statistics (no data read); None when not recorded."""
    total = 0
    for f in files:
        md = pq.read_metadata(f)
        j = md.schema.to_arrow_schema().get_field_index(column)
        for g in range(md.num_row_groups):
            stats = md.row_group(g).column(j).statistics
            if stats is None or not stats.has_null_count:
                return None
            total += stats.null_count
    return total


def preprocess(s: Settings) -> dict:
    cfg, d = s.preprocess, s.dataset
    check_validated(s)
    if d.modality == "image":
        return preprocess_images(s)
    files = parquet_files(s.validate_.out)
    check_columns(s, files)
    n_rows = count_rows(files)
    if _null_count(files, d.target) == n_rows:
        raise UserError(
            f"dataset.target: column {d.target!r} is missing in all {n_rows:,} rows of "
            f"{s.validate_.out}; there is nothing to train on. Check dataset.target and the data"
        )
    kinds = {c: k for c, k in d.columns.items() if k != "ignore"}
    reused = reused_transform(s)  # train.init_transform reuse: the parent's transform, checked before any work
    with dask_client(s.dask, "preprocess") as client, atomic_dir(cfg.out_dir) as stage:
        schema = build_features(client, files, n_rows, list(d.key), kinds, d, cfg, stage, reused)
    if schema["dropped_missing_target"]:
        log.warning("preprocess: %d of %d rows have no %s and were left out", schema["dropped_missing_target"], n_rows, d.target)
    return schema


def preprocess_images(s: Settings) -> dict:
    """dataset.modality image: decoded and resized into uint8 shards on Dask (tasks/images/shards.py); the labels
    checked across the splits as a table's are."""
    from tasks.images.shards import finish, first_pass

    target = pq.read_schema(parquet_files(s.validate_.out)[0]).field(s.dataset.target).type
    with dask_client(s.dask, "preprocess") as client, atomic_dir(s.preprocess.out_dir) as stage:
        counts, results = first_pass(client, s, stage)
        return finish(stage, s, check_target(counts, s.dataset, None), counts, results, label_dtype(target))


def build_features(
    client, files: list[Path], n_rows: int, key: list[str], kinds: dict, d, cfg, stage: Path, reused: tuple | None = None
) -> dict:
    """The Dask part, into directory `stage`: pass 1 splits the rows, writes the raw test rows and computes the
    train statistics and the target's counts per split; the target is checked; pass 2 fits the transform (or takes
    the parent's, `reused`: (transform, where from)) and reads the input again (only the columns it uses) to
    encode the splits; then the schema that training reads.
    A Dask task per piece of whole row groups (tasks/tables.py), working through it in batches of
    preprocess.partition_rows rows with Arrow and numpy: memory is bounded by a batch per worker thread."""
    if not key:  # the columns other than the target: transforming or relabelling the target moves no row
        key = [c for c in pq.read_schema(files[0]).names if c != d.target]
    stats, counts = first_pass(client, files, key, kinds, d, cfg, stage)
    if stats is None:
        rows = {split: sum(c.values()) for split, c in counts.items()}
        raise UserError(
            f"preprocess: the train split is empty (rows per split: {rows}); give more data or change preprocess.split"
        )
    lowest = LOWEST.get(d.target_transform) if d.task == "regression" else None
    target = {
        "name": d.target,
        "task": d.task,
        "transform": d.target_transform,
        "classes": check_target(counts, d, lowest),
        "dtype": label_dtype(pq.read_schema(files[0]).field(d.target).type),
    }
    if reused is not None and reused[0]["classes"] != (target["classes"] or None):
        raise UserError(
            f"train.init_transform=reuse: the parent's classes {reused[0]['classes']} are not this train split's "
            f"{target['classes']}; set train.init_transform: refit (the output layer then starts anew)"
        )
    transform = second_pass(client, files, stats, key, kinds, target, d, cfg, stage, reused[0] if reused else None)
    schema = describe(stage, transform, d, n_rows, counts) | {"transform_from": reused[1] if reused else None}
    write_json(stage / "transform.json", transform)
    write_json(stage / "schema.json", schema)
    return schema


def _batches(piece: Piece, rows: int, columns: list[str] | None = None):
    """The piece's rows as tables of at most `rows` rows, with the input's pandas metadata (so each converts to
    the dtypes the whole table has)."""
    f = pq.ParquetFile(piece.file)
    metadata = f.schema_arrow.metadata
    for b in f.iter_batches(batch_size=rows, row_groups=list(piece.row_groups), columns=columns):
        yield pa.Table.from_batches([b]).replace_schema_metadata(metadata)


def _split_rows(table: pa.Table, key: list[str], target: str, fractions) -> tuple[pa.Table, pd.DataFrame, np.ndarray]:
    """The rows that have a target, as Arrow and as pandas, and their split codes (0 train, 1 val, 2 test)."""
    frame = table.to_pandas()
    keep = frame[target].notna().to_numpy()
    if not keep.all():
        table, frame = table.filter(keep), frame[keep].reset_index(drop=True)
    return table, frame, split_codes(frame[key], fractions)


def _target_counts(y: pd.Series, split: np.ndarray, task: str, lowest: float | None) -> dict:
    """Per split, the rows of each label (classification), or of a target outside the transform's domain."""
    if task == "regression":
        bad = (y <= lowest).to_numpy() if lowest is not None else np.zeros(len(y), bool)
        return {SPLITS[k]: {"invalid": int(bad[split == k].sum())} for k in np.unique(split)}
    sizes = pd.DataFrame({"split": split, "y": y}).groupby(["split", "y"], observed=True).size()
    out: dict = {}
    for (k, label), n in sizes.items():
        out.setdefault(SPLITS[k], {})[str(label)] = int(n)
    return out


def _first_piece(piece: Piece, i: int, by: list[str], kinds: dict, d, cfg, stage: Path) -> dict:
    """One piece read once, in batches of preprocess.partition_rows rows: its raw test rows written to
    stage/test_raw, its train statistics and its target counts per split returned (and, for the quantile
    scaler, its expanded numeric train columns written to stage/_quantiles)."""
    regression = d.task == "regression"
    lowest = LOWEST[d.target_transform][0] if regression and d.target_transform in LOWEST else None
    fractions = (cfg.split.train, cfg.split.val, cfg.split.test)
    stats, counts = [], []
    for j, table in enumerate(_batches(piece, cfg.partition_rows)):
        table, frame, split = _split_rows(table, by, d.target, fractions)
        pq.write_table(table.filter(split == 2), stage / "test_raw" / f"part-{i:05d}-{j:03d}.parquet")
        y = frame[d.target].astype("float64") if regression else label_text(frame[d.target])
        counts.append(_target_counts(y, split, d.task, lowest))
        train = expand(frame.loc[split == 0, list(kinds)], kinds).assign(**{d.target: y[split == 0]})
        if len(train):
            stats.append(train_stats(train, kinds, d.target, d.target_transform if regression else None))
            if cfg.scaler == "quantile":
                train[numeric_names(kinds)].to_parquet(stage / "_quantiles" / f"part-{i:05d}-{j:03d}.parquet", index=False)
    return {"stats": stats, "counts": counts}


def first_pass(client, files: list[Path], key: list[str], kinds: dict, d, cfg, stage: Path) -> tuple[dict | None, dict]:
    """Each piece of the input (whole row groups) read once by a task: the merged train statistics (None
    without a train row) and the target's counts per split."""
    for name in ("test_raw", "_quantiles"):
        (stage / name).mkdir()
    parts = pieces(files, cfg.partition_rows)
    task = partial(_first_piece, by=key, kinds=kinds, d=d, cfg=cfg, stage=stage)
    results = gather(client, client.map(task, parts, range(len(parts)), pure=False))
    stats = merge_stats([s for r in results for s in r["stats"]]) if any(r["stats"] for r in results) else None
    counts: dict = {}
    for c in (c for r in results for c in r["counts"]):
        for split, labels in c.items():
            for label, n in labels.items():
                counts.setdefault(split, {})[label] = counts.get(split, {}).get(label, 0) + n
    return stats, counts


def _second_piece(piece: Piece, i: int, by: list[str], kinds: dict, transform: dict, d, cfg, stage: Path) -> None:
    """One piece read again (only the columns the split and the transform use): each batch encoded and its rows
    written to stage/train, val and test."""
    columns = list(dict.fromkeys([*by, *kinds, d.target]))
    fractions = (cfg.split.train, cfg.split.val, cfg.split.test)
    names = [*transform["features"], d.target]
    for j, table in enumerate(_batches(piece, cfg.partition_rows, columns)):
        _, frame, split = _split_rows(table, by, d.target, fractions)
        x = encode(transform, expand(frame, kinds))
        y = encode_target(transform, frame[d.target])
        x = np.asfortranarray(x)  # a column at a time below
        for k, name in enumerate(SPLITS):
            rows = np.flatnonzero(split == k)
            out = pa.table([*(x[:, f].take(rows) for f in range(x.shape[1])), y.take(rows)], names=names)
            pq.write_table(out, stage / name / f"part-{i:05d}-{j:03d}.parquet")


def second_pass(
    client,
    files: list[Path],
    stats: dict,
    key: list[str],
    kinds: dict,
    target: dict,
    d,
    cfg,
    stage: Path,
    reused: dict | None = None,
) -> dict:
    """The transform fitted on the train statistics (and quantiles), or the one `reused`; then each piece read
    again and encoded."""
    quantiles = None
    if cfg.scaler == "quantile" and reused is None:  # Dask's (approximate) quantiles of the train rows' expanded columns
        # one partition per batch, as written (dd.read_parquet would fuse files as its heuristics see fit)
        train = dd.from_map(pd.read_parquet, sorted(str(f) for f in (stage / "_quantiles").glob("*.parquet")))
        quantiles = show_progress(client, [train.quantile(list(np.linspace(0, 1, cfg.n_quantiles)))])[0]
    shutil.rmtree(stage / "_quantiles")
    transform = reused or fit(stats, kinds, target, cfg.scaler, cfg.n_quantiles, cfg.min_frequency, cfg.max_categories, quantiles)
    for name in SPLITS:
        (stage / name).mkdir()
    parts = pieces(files, cfg.partition_rows)
    task = partial(_second_piece, by=key, kinds=kinds, transform=transform, d=d, cfg=cfg, stage=stage)
    gather(client, client.map(task, parts, range(len(parts)), pure=False))
    return transform


def describe(stage: Path, transform: dict, d, n_rows: int, counts: dict) -> dict:
    """schema.json: what training reads instead of scanning the data; an empty split stops here."""
    rows = {name: count_rows(list((stage / name).glob("*.parquet"))) for name in SPLITS}
    kept = sum(rows.values())
    if kept == 0:
        raise UserError(
            f"dataset.target: column {d.target!r} is missing in all {n_rows:,} rows; there is nothing "
            "to train on. Check dataset.target and the data"
        )
    if min(rows.values()) == 0:
        raise UserError(f"preprocess: a split is empty ({rows}) from {kept} rows; give more data or change preprocess.split")
    classes = transform["classes"]
    return {
        "dataset": d.name,
        "task": d.task,
        "features": transform["features"],
        "target": d.target,
        "target_transform": transform["target_transform"],
        "classes": classes,
        "class_rows": {split: [counts.get(split, {}).get(c, 0) for c in classes] for split in SPLITS} if classes else None,
        "n_features": len(transform["features"]),
        "categorical": categorical_features(transform),
        "rows": rows,
        "dropped_missing_target": n_rows - kept,
    }


if __name__ == "__main__":
    cli(preprocess)
