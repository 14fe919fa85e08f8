"""Clean, split and scale validated raw data on Dask; write Parquet splits and the fitted transform.
Run: python -m tasks.preprocess

- Split: each row goes to train/val/test by a hash of its values, so a rerun (or a rerun after rows are
  appended) keeps every row in the split it was in, on any cluster.
- Scaling is fitted on train only and saved as one JSON transform; `apply_transform` is the single
  implementation used here and by the model package, so training and serving cannot skew.
- Output (`preprocess.out_dir`): train/, val/, test/ (scaled features + target), test_raw/ (the same test
  rows unscaled, for package checks), transform.json, schema.json.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from statistics import NormalDist

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tasks.cluster import dask_client
from tasks.files import atomic_dir, sha256_path, write_json
from tasks.settings import Settings, UserError, cli
from tasks.tables import count_rows, parquet_files

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
HASH_BUCKETS = 1_000_000
CLIP = 1e-7  # quantile levels are clipped to [CLIP, 1 - CLIP] before the normal ppf, as sklearn does


def assign_split(part: pd.DataFrame, fractions: tuple[float, float, float]) -> pd.Series:
    """'train' / 'val' / 'test' for each row, from a hash of the row's values (stable, order-free)."""
    bucket = pd.util.hash_pandas_object(part, index=False).to_numpy() % HASH_BUCKETS
    train_end = round(fractions[0] * HASH_BUCKETS)
    val_end = round((fractions[0] + fractions[1]) * HASH_BUCKETS)
    names = np.where(bucket < train_end, "train", np.where(bucket < val_end, "val", "test"))
    return pd.Series(names, index=part.index, dtype="string")


def fit_transform(s: Settings, train: dd.DataFrame, features: list[str]) -> dict:
    """Fit feature scaling and target standardisation on the train split (one Dask pass)."""
    cfg = s.preprocess
    target = train[cfg.target]
    if cfg.scaler == "quantile":
        levels = np.linspace(0, 1, cfg.n_quantiles)
        q, t_mean, t_std = dask.compute(train[features].quantile(list(levels)), target.mean(), target.std())
        refs = [NormalDist().inv_cdf(p) for p in np.clip(levels, CLIP, 1 - CLIP)]
        columns = {c: {"quantiles": q[c].tolist(), "references": refs} for c in features}
    else:
        mean, std, t_mean, t_std = dask.compute(train[features].mean(), train[features].std(), target.mean(), target.std())
        columns = {c: {"mean": float(mean[c]), "std": float(std[c]) or 1.0} for c in features}
    return {
        "version": 1,
        "scaler": cfg.scaler,
        "features": features,
        "target": cfg.target,
        "columns": columns,
        "target_mean": float(t_mean),
        "target_std": float(t_std) or 1.0,
    }


def apply_transform(transform: dict, frame: pd.DataFrame) -> np.ndarray:
    """Raw feature columns -> float32 model inputs (n_rows, n_features). Pure numpy; no Dask, no torch."""
    out = np.empty((len(frame), len(transform["features"])), dtype=np.float32)
    for j, name in enumerate(transform["features"]):
        x = frame[name].to_numpy(dtype=np.float64)
        p = transform["columns"][name]
        if transform["scaler"] == "quantile":
            q, r = np.asarray(p["quantiles"]), np.asarray(p["references"])
            # average of forward and backward interpolation handles repeated quantiles (ties), as sklearn
            out[:, j] = 0.5 * (np.interp(x, q, r) - np.interp(-x, -q[::-1], -r[::-1]))
        else:
            out[:, j] = (x - p["mean"]) / p["std"]
    return out


def _scaled(part: pd.DataFrame, transform: dict) -> pd.DataFrame:
    frame = pd.DataFrame(apply_transform(transform, part), columns=transform["features"], index=part.index)
    frame[transform["target"]] = part[transform["target"]].astype("float32")
    frame["split"] = part["split"]
    return frame


def _parquet_rows(directory: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in directory.glob("*.parquet"))


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


def preprocess(s: Settings) -> dict:
    cfg = s.preprocess
    check_validated(s)
    data = Path(s.validate_.out)
    files = parquet_files(data)
    n_rows = count_rows(files)
    columns = pq.read_schema(files[0]).names
    if cfg.target not in columns:
        raise UserError(f"preprocess.target: column {cfg.target!r} is not in {data} (columns: {columns}); set preprocess.target")
    features = [c for c in columns if c != cfg.target]

    with dask_client(s.dask, "preprocess"):
        ddf = dd.read_parquet([str(f) for f in files])
        non_numeric = [c for c, t in ddf.dtypes.items() if not pd.api.types.is_numeric_dtype(t)]
        if non_numeric:
            raise UserError(f"preprocess: columns {non_numeric} are not numeric; this release trains on numeric columns only")
        ddf = ddf.repartition(npartitions=max(1, math.ceil(n_rows / cfg.partition_rows)))
        ddf = ddf.dropna(subset=[cfg.target])
        fractions = (cfg.split.train, cfg.split.val, cfg.split.test)
        ddf = ddf.assign(split=ddf[features + [cfg.target]].map_partitions(assign_split, fractions, meta=("split", "string")))
        transform = fit_transform(s, ddf[ddf.split == "train"], features)
        scaled = ddf.map_partitions(_scaled, transform, meta=_scaled(ddf._meta, transform))

        with atomic_dir(cfg.out_dir) as stage:
            def part_name(i: int) -> str:
                return f"part-{i:05d}.parquet"

            writes = [
                scaled[scaled.split == name].drop(columns="split").to_parquet(
                    stage / name, write_index=False, compute=False, name_function=part_name)
                for name in SPLITS
            ]
            writes.append(ddf[ddf.split == "test"].drop(columns="split").to_parquet(
                stage / "test_raw", write_index=False, compute=False, name_function=part_name))
            dask.compute(*writes)
            rows = {name: _parquet_rows(stage / name) for name in SPLITS}
            if min(rows.values()) == 0:
                raise UserError(f"preprocess: a split is empty ({rows}) from {n_rows} rows; give more data or change preprocess.split")
            schema = {
                "features": features, "target": cfg.target, "n_features": len(features), "rows": rows,
                "dropped_missing_target": n_rows - sum(rows.values()),
            }
            write_json(stage / "transform.json", transform)
            write_json(stage / "schema.json", schema)
    return schema


if __name__ == "__main__":
    cli(preprocess)
