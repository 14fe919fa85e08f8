"""Grow a real dataset to N rows by resampling its rows with small jitter, as partitioned Parquet.

Run: python bench/scale_up.py data/sources/california_housing.parquet 10000000 /tmp/cal-10m

Scale tests then see realistic distributions, correlations and missing values instead of uniform noise.
Numeric values get Gaussian jitter of `jitter` × the column's std, clipped to the column's observed range
(so the dataset's expectation suite still holds) and rounded where the column holds whole numbers;
other columns and missing values are resampled as they are. One file of `rows_per_file` rows is built
and written at a time, so memory stays flat whatever N is; the same seed gives the same files.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.files import atomic_dir
from tasks.ingest import read_table


def scale_up(
    source: str, n_rows: int, out_dir: str | Path, rows_per_file: int = 1_000_000, jitter: float = 0.01, seed: int = 0
) -> dict:
    frame, _ = read_table(source)
    numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]
    spread = {c: jitter * float(frame[c].std() or 0.0) for c in numeric}
    bounds = {c: (frame[c].min(), frame[c].max()) for c in numeric}
    whole = {c for c in numeric if np.allclose(frame[c].dropna() % 1, 0)}
    files = []
    with atomic_dir(out_dir) as stage:
        for i, start in enumerate(range(0, n_rows, rows_per_file)):
            rng = np.random.default_rng([seed, i])
            part = frame.iloc[rng.integers(0, len(frame), min(rows_per_file, n_rows - start))].reset_index(drop=True)
            for c in numeric:  # NaN stays NaN through noise, clip and round
                x = np.clip(part[c].to_numpy(dtype=np.float64) + rng.normal(0.0, spread[c], len(part)), *bounds[c])
                x = np.round(x) if c in whole else x
                part[c] = x if np.isnan(x).any() else x.astype(frame[c].dtype)
            name = f"part-{i:05d}.parquet"
            part.to_parquet(stage / name, index=False)
            files.append(name)
    return {"rows": n_rows, "files": len(files), "out_dir": str(out_dir)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", help="CSV or Parquet file (path or fsspec URL)")
    ap.add_argument("rows", type=int, help="rows to write")
    ap.add_argument("out_dir", help="directory of part-NNNNN.parquet files (replaced when done)")
    ap.add_argument("--rows-per-file", type=int, default=1_000_000)
    ap.add_argument("--jitter", type=float, default=0.01, help="noise, in column standard deviations")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(scale_up(a.source, a.rows, a.out_dir, a.rows_per_file, a.jitter, a.seed))


if __name__ == "__main__":
    main()
