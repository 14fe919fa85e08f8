"""Batch inference from a model package: rows/s and peak memory on 1M rows; the package's size and load time.

Run: .venv/bin/python bench/predict.py [--package models/package] [--rows 1000000]   (about 1 minute)

The input is California Housing scaled up with bench/scale_up.py (real rows with small jitter) into Parquet
files of 250k rows, so it is scored in 4 partitions on a local Dask cluster; each run is a fresh process
(import and package checks included), peak RSS is the whole process tree.
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from measure import measured  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--package", default="models/package")
    ap.add_argument("--archive", default="models/package.tar.gz")
    ap.add_argument("--rows", type=int, default=1_000_000)
    a = ap.parse_args()
    size = sum(p.stat().st_size for p in Path(a.package).iterdir())
    print(
        f"package {a.package}: {size / 1e6:.2f} MB ({len(list(Path(a.package).iterdir()))} files); "
        f"{a.archive}: {Path(a.archive).stat().st_size / 1e6:.2f} MB"
    )
    load = measured(
        "import json, sys, time; t = time.perf_counter(); from tasks.modelpackage import open_package; "
        "t1 = time.perf_counter(); p = open_package(sys.argv[1]).__enter__(); t2 = time.perf_counter(); "
        "print(json.dumps({'import_s': t1 - t, 'load_s': t2 - t1}))",
        a.package,
    )
    tar = measured(
        "import json, sys, time; from tasks.modelpackage import open_package; t = time.perf_counter(); "
        "open_package(sys.argv[1]).__enter__(); print(json.dumps({'load_s': time.perf_counter() - t}))",
        a.archive,
    )
    print(
        "open_package (sha256 of every file + ONNX external-data check + onnxruntime session): "
        f"directory {load['load_s'] * 1000:.0f} ms, "
        f".tar.gz {tar['load_s'] * 1000:.0f} ms (import {load['import_s']:.2f} s)"
    )
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        data = Path(tmp) / "input"
        measured(
            "import json, sys, scale_up; sys.argv = ['scale_up', *sys.argv[1:]]; scale_up.main(); print('{}')",
            str(ROOT / "data/sources/california_housing.parquet"),
            str(a.rows),
            str(data),
            "--rows-per-file",
            "250000",
        )
        r = measured(
            "import json, sys; from tasks.predict import predict_file; print(json.dumps(predict_file(*sys.argv[1:])))",
            a.package,
            str(data),
            str(Path(tmp) / "pred.parquet"),
        )
        print(
            f"predict {r['rows']:,} rows ({r['mode']}): {r['predicted']:,} predicted, {r['rejected']:,} rejected, "
            f"{r['seconds']:.1f} s = {r['rows_per_s']:,.0f} rows/s, peak RSS {r['peak_rss_gib']:.2f} GiB"
        )


if __name__ == "__main__":
    main()
