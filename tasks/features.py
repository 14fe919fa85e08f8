"""The feature transform: fitted on the train split, saved as one JSON, applied the same way everywhere.

Pure pandas/numpy, no Dask and no torch: preprocessing runs it per Dask partition, the model package and
batch inference run it on their input, so training and serving cannot skew. The fit works from
statistics that each Dask partition computes on its own and that merge exactly or stably
(`train_stats`, `merge_stats`); a pandas frame is one partition, which is also how bench/preprocess.py
checks the Dask pipeline against a plain pandas one.

Per column kind (dataset.columns):
- numeric: missing values imputed with the train mean, plus a `<name>__missing` indicator (0/1) when the
  train split has missing values; then standard (z-score) or quantile (to a normal) scaling;
- datetime: expanded to year, month, day, dayofweek, hour (UTC), each then treated as numeric;
- categorical: a vocabulary of the values seen at least `preprocess.min_frequency` times in train, in
  sorted order, coded 1..K; 0 is the out-of-vocabulary bucket (rare, unseen and missing values). The
  model embeds these codes;
- ignore: not read.

The target, per dataset.task:
- regression: standardised for training (train mean and std), after dataset.target_transform (log or log1p,
  inverted inside the package: predictions and metrics stay in the target's units);
- binary / multiclass: the labels seen in the train split, in sorted order, are the classes 0..K-1; a label
  is compared as text (`label_text`: 1, 1.0 and "1" are one label), and the package maps back to the label.
"""

from __future__ import annotations

from collections.abc import Callable
from statistics import NormalDist

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tasks.settings import UserError

VERSION = 3  # 3: the task, classes and target transform
HASH_BUCKETS = 1_000_000
CLIP = 1e-7  # quantile levels are clipped to [CLIP, 1 - CLIP] before the normal ppf, as sklearn does
DATE_PARTS = ("year", "month", "day", "dayofweek", "hour")
MISSING = "__missing"
SPLITS = ("train", "val", "test")  # split_codes 0, 1, 2


def _text_as_categorical(col: pd.Series) -> pd.Categorical:
    """Text as a Categorical built by Arrow (no Python string per row). pandas hashes a Categorical by its
    categories and codes, exactly as it hashes the same text as objects, whichever string dtype was read."""
    arr = pa.array(col, from_pandas=True)
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    enc = pc.dictionary_encode(arr.cast(pa.large_string()))
    return pd.Categorical.from_codes(
        pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False),
        categories=pd.Index(enc.dictionary.to_pylist(), dtype=object),
    )


TARGET_TRANSFORMS: dict[str, tuple[Callable, Callable]] = {  # forward, inverse
    "none": (lambda y: y, lambda y: y),
    "log": (np.log, np.exp),
    "log1p": (np.log1p, np.expm1),
}
LOWEST = {"log": (0.0, "> 0"), "log1p": (-1.0, "> -1")}  # a transformed target must exceed this


def label_text(col: pd.Series) -> pd.Series:
    """Labels as text, one spelling per label: integral numbers without '.0', booleans as True/False."""
    if pd.api.types.is_bool_dtype(col):
        return col.astype("string").str.capitalize()
    if pd.api.types.is_numeric_dtype(col):
        x = col.astype("float64")
        integral = x.notna() & np.isfinite(x) & (x == np.round(x))
        text = x.astype("string")
        return text.where(~integral, x.where(integral).astype("Int64").astype("string"))
    return col.astype("string")


def label_value(text: str, dtype: str):
    """A label's text back as a value of the target's type (for predictions and the model card)."""
    if dtype == "int":
        return int(text)
    if dtype == "float":
        return float(text)
    if dtype == "bool":
        return text == "True"
    return text


def split_codes(part: pd.DataFrame, fractions: tuple[float, float, float]) -> np.ndarray:
    """0 (train), 1 (val) or 2 (test) for each row, from a hash of its key columns (stable, order-free)."""
    part = pd.DataFrame(
        {c: part[c] if pd.api.types.is_numeric_dtype(t) else _text_as_categorical(part[c]) for c, t in part.dtypes.items()},
        index=part.index,
    )
    bucket = pd.util.hash_pandas_object(part, index=False).to_numpy() % HASH_BUCKETS
    train_end = round(fractions[0] * HASH_BUCKETS)
    val_end = round((fractions[0] + fractions[1]) * HASH_BUCKETS)
    return (bucket >= train_end).astype(np.int8) + (bucket >= val_end)


def assign_split(part: pd.DataFrame, fractions: tuple[float, float, float]) -> pd.Series:
    """'train' / 'val' / 'test' for each row (split_codes as names)."""
    return pd.Series(np.array(SPLITS, dtype=object)[split_codes(part, fractions)], index=part.index, dtype="string")


def expand(part: pd.DataFrame, kinds: dict[str, str]) -> pd.DataFrame:
    """Row-wise and stateless: numeric columns as float64, datetimes as numeric parts, categoricals as text."""
    cols = {}
    for name, kind in kinds.items():
        col = part[name]
        if kind == "numeric":
            cols[name] = col.astype("float64")
        elif kind == "datetime":
            cols |= {f"{name}__{p}": x for p, x in _date_parts(col).items()}
        elif kind == "categorical":
            cols[name] = col.astype("string[pyarrow]")
    return pd.DataFrame(cols, index=part.index)


def _date_parts(col: pd.Series) -> dict[str, np.ndarray]:
    """pd.to_datetime(col, utc=True, errors="coerce")'s DATE_PARTS as float64, each distinct value parsed once
    (timestamps repeat: a year of hourly data has 8,760) and its parts taken for each row; missing: NaN."""
    codes, distinct = pd.factorize(col)  # distinct in order of appearance (the parse infers its format from the first)
    t = pd.to_datetime(pd.Series(distinct), utc=True, errors="coerce")
    return {p: np.append(getattr(t.dt, p).to_numpy(np.float64, na_value=np.nan), np.nan)[codes] for p in DATE_PARTS}


def numeric_names(kinds: dict[str, str]) -> list[str]:
    out = []
    for name, kind in kinds.items():
        out += [name] if kind == "numeric" else [f"{name}__{p}" for p in DATE_PARTS] if kind == "datetime" else []
    return out


def train_stats(part: pd.DataFrame, kinds: dict[str, str], target: str, target_transform: str | None = "none") -> dict:
    """Statistics of one piece of the expanded train split that merge exactly (counts) or stably (mean and
    sum of squared deviations, combined as Chan et al.): one small result per Dask partition. A regression
    target's are of the transformed target; a label's (target_transform None) are counted elsewhere."""
    numeric = numeric_names(kinds) + ([target] if target_transform is not None else [])
    x = part[numeric].to_numpy(dtype=np.float64, na_value=np.nan)
    if target_transform not in (None, "none"):
        with np.errstate(invalid="ignore", divide="ignore"):  # (a non-positive target is refused before)
            x[:, -1] = TARGET_TRANSFORMS[target_transform][0](x[:, -1])
    present = ~np.isnan(x)
    n = present.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, np.nansum(x, axis=0) / np.maximum(n, 1), 0.0)
    m2 = np.nansum((x - mean) ** 2, axis=0)
    counts = {c: part[c].value_counts() for c, k in kinds.items() if k == "categorical"}
    return {"columns": numeric, "n": n, "mean": mean, "m2": m2, "rows": len(part), "counts": counts}


def merge_stats(parts: list[dict]) -> dict:
    out = parts[0]
    for b in parts[1:]:
        n = out["n"] + b["n"]
        delta = b["mean"] - out["mean"]
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(n > 0, b["n"] / np.maximum(n, 1), 0.0)
            mean = out["mean"] + delta * share
            m2 = out["m2"] + b["m2"] + delta**2 * out["n"] * share
        counts = {c: out["counts"][c].add(b["counts"][c], fill_value=0) for c in out["counts"]}
        out = {"columns": out["columns"], "n": n, "mean": mean, "m2": m2, "rows": out["rows"] + b["rows"], "counts": counts}
    return out


def fit(
    stats: dict,
    kinds: dict[str, str],
    target: dict,
    scaler: str,
    n_quantiles: int,
    min_frequency: int,
    max_categories: int,
    quantiles: pd.DataFrame | None = None,
) -> dict:
    """The transform from the merged train statistics (and, for the quantile scaler, the train quantiles
    of the numeric columns at np.linspace(0, 1, n_quantiles)). `target`: name, task, transform (regression),
    classes and dtype (classification: the label texts of the train split, sorted, and the target's type)."""
    numeric = numeric_names(kinds)
    categorical = [c for c, k in kinds.items() if k == "categorical"]
    col = {c: j for j, c in enumerate(stats["columns"])}

    def mean_std(c: str) -> tuple[float, float]:
        j = col[c]
        n, m2 = stats["n"][j], stats["m2"][j]
        std = float(np.sqrt(m2 / (n - 1))) if n > 1 else 0.0
        return (float(stats["mean"][j]) if n else 0.0), (std or 1.0)  # constant or empty column: std 1

    columns = {}
    for c in numeric:
        m, s = mean_std(c)
        p: dict = {"mean": m, "std": s, "indicator": bool(stats["n"][col[c]] < stats["rows"])}
        if scaler == "quantile":
            assert quantiles is not None  # the quantile scaler is fitted with them
            q = quantiles[c].to_numpy(dtype=np.float64)
            p["quantiles"] = np.where(np.isnan(q), m, q).tolist()
        columns[c] = p
    vocab = vocabularies(stats["counts"], categorical, min_frequency, max_categories)
    features = numeric + [f"{c}{MISSING}" for c in numeric if columns[c]["indicator"]] + categorical
    regression = target["task"] == "regression"
    t_mean, t_std = mean_std(target["name"]) if regression else (0.0, 1.0)
    return {
        "version": VERSION,
        "task": target["task"],
        "target_transform": target.get("transform", "none") if regression else "none",
        "classes": None if regression else list(target["classes"]),
        "label_dtype": None if regression else target["dtype"],
        "inputs": {c: k for c, k in kinds.items() if k != "ignore"},
        "scaler": scaler,
        "references": [NormalDist().inv_cdf(p) for p in np.clip(np.linspace(0, 1, n_quantiles), CLIP, 1 - CLIP)]
        if scaler == "quantile"
        else None,
        "numeric": columns,
        "categorical": {c: {"vocabulary": vocab[c]} for c in categorical},
        "features": features,
        "target": target["name"],
        "target_mean": t_mean,
        "target_std": t_std,
    }


def vocabularies(counts: dict, categorical: list[str], min_frequency: int, max_categories: int) -> dict[str, list[str]]:
    """Each categorical column's vocabulary: the train values seen at least min_frequency times, sorted."""
    vocab = {}
    for c in categorical:
        vc = counts[c]
        if len(vc) > max_categories:
            raise UserError(
                f"dataset.columns: categorical column {c!r} has {len(vc):,} distinct values in the train split, "
                f"more than preprocess.max_categories={max_categories:,}: a vocabulary that large does not generalise "
                "and would not fit an embedding. Declare it ignore (an identifier) or numeric, or raise preprocess.max_categories"
            )
        vocab[c] = sorted(str(v) for v, n in vc.items() if n >= min_frequency)
    return vocab


def encode_target(transform: dict, col: pd.Series) -> np.ndarray:
    """The target as training reads it: a regression target as it is (float32); a label as its class index
    (float32; -1 for a label that is not a class)."""
    if transform["task"] == "regression":
        return col.to_numpy(dtype=np.float32, na_value=np.nan)
    return pd.Index(transform["classes"]).get_indexer(label_text(col).fillna("<NA>")).astype(np.float32)


def categorical_features(transform: dict) -> list[dict]:
    """For the model: the position of each categorical code column and its number of codes (with OOV)."""
    return [
        {"name": c, "index": transform["features"].index(c), "cardinality": len(v["vocabulary"]) + 1}
        for c, v in transform["categorical"].items()
    ]


def apply_transform(transform: dict, frame: pd.DataFrame) -> np.ndarray:
    """Raw input columns -> float32 model inputs (n_rows, n_features), in transform["features"] order."""
    if transform.get("version") not in (2, VERSION):  # 2: a regression transform of before (the same encoding)
        raise UserError(f"transform version {transform.get('version')} is not {VERSION}; rerun the preprocess stage")
    return encode(transform, expand(frame, transform["inputs"]))


def encode(transform: dict, expanded: pd.DataFrame) -> np.ndarray:
    """Expanded columns (see `expand`) -> float32 model inputs: impute, scale, code categories."""
    out = np.empty((len(expanded), len(transform["features"])), dtype=np.float32)
    index = {name: j for j, name in enumerate(transform["features"])}
    refs = np.asarray(transform["references"]) if transform["scaler"] == "quantile" else None
    for name, p in transform["numeric"].items():
        x = expanded[name].to_numpy(dtype=np.float64, na_value=np.nan)
        missing = np.isnan(x)
        x = np.where(missing, p["mean"], x)
        if refs is not None:
            q = np.asarray(p["quantiles"])
            # average of forward and backward interpolation handles repeated quantiles (ties), as sklearn
            out[:, index[name]] = 0.5 * (np.interp(x, q, refs) - np.interp(-x, -q[::-1], -refs[::-1]))
        else:
            out[:, index[name]] = (x - p["mean"]) / p["std"]
        if p["indicator"]:
            out[:, index[f"{name}{MISSING}"]] = missing
    for name, p in transform["categorical"].items():
        arr = pa.array(expanded[name].astype("string[pyarrow]"), from_pandas=True)
        position = pc.index_in(arr, value_set=pa.array(p["vocabulary"], pa.string()))  # null: not in the vocabulary
        out[:, index[name]] = pc.fill_null(position, -1).to_numpy(zero_copy_only=False) + 1  # out of vocabulary -> 0
    return out
