"""The validate stage on scaled-up California Housing: in memory vs per Dask partition, side by side.

Run: .venv/bin/python bench/validate.py            (1M and 10M rows; about 6 minutes on 2 cores)
     .venv/bin/python bench/validate.py --rows 10000000 --rounds 3

For each size, bench/scale_up.py grows the real data to N rows (files of 1M rows, joined into one Parquet
file of 1M-row row groups), then the real stage (`tasks.validate.validate`, default suite and params) runs
in a fresh process twice on that same file: in memory (`validate.in_memory_max_rows` above N) and
partitioned (`in_memory_max_rows: 0`: one Dask partition per row group on the default local cluster,
params.yaml's `dask` section). Time is the stage's own wall time, cluster start included; peak RSS is the
largest total resident memory of the process and all its children (Dask scheduler, nannies, workers),
sampled every 50 ms. With --rounds N the two run in turn N times and each one's fastest run is shown (on a
shared machine the others' load comes and goes). `same`: both wrote the same report (less the mode and the
paths), the same accepted data and the same reference statistics.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from measure import measured  # noqa: E402
from scale_up import scale_up  # noqa: E402


def make_input(rows: int, work: Path) -> Path:
    parts = work / f"parts-{rows}"
    scale_up(str(ROOT / "data/sources/california_housing.parquet"), rows, parts)
    single = work / f"data-{rows}.parquet"
    files = sorted(parts.glob("*.parquet"))
    with pq.ParquetWriter(single, pq.read_schema(files[0])) as w:
        for f in files:
            w.write_table(pq.read_table(f), row_group_size=1_000_000)
    return single


def params_for(work: Path, data: Path, partitioned: bool) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    run = work / ("partitioned" if partitioned else "in-memory")
    run.mkdir(exist_ok=True)
    for key in ("out", "quarantine", "report", "report_md", "reference"):
        raw["validate"][key] = str(run / Path(raw["validate"][key]).name)
    raw["dataset"]["suite"] = str(ROOT / raw["dataset"]["suite"])
    raw["validate"]["in_memory_max_rows"] = 0 if partitioned else 10**12
    raw["validate"]["drift"] = "off"
    raw["ingest"]["out"] = str(run / "raw.parquet")  # inside the run's project (tasks/paths.py): a link to the data
    (run / "raw.parquet").unlink(missing_ok=True)
    os.link(data, run / "raw.parquet")
    path = run / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def measure(params: Path) -> dict:
    """Run the stage in a fresh process; its wall time, and the peak RSS of its process tree."""
    code = (
        "import json, sys, time; from tasks.settings import load_settings; from tasks.validate import validate; "
        "s = load_settings(sys.argv[1]); t = time.perf_counter(); out = validate(s); "
        "print(json.dumps({'seconds': time.perf_counter() - t, 'rows': out['rows'], 'checked': out['checked']}))"
    )
    return measured(code, str(params))


def same(work: Path) -> str:
    """The two runs' reports (less the mode and the paths), accepted data and reference statistics are equal."""
    runs = [work / mode for mode in ("in-memory", "partitioned")]
    reports = [json.loads((r / "report.json").read_text()) for r in runs]
    for r in reports:
        del r["checked"], r["data"]["path"], r["validated"]["path"], r["drift"]["reference"]
    stats = [json.loads((r / "stats.json").read_text()) for r in runs]
    assert reports[0] == reports[1] and stats[0] == stats[1], "in-memory and partitioned validation differ"
    return "yes"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, action="append", help="rows (repeatable); default 1M and 10M")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the two modes in turn; each one's fastest is shown")
    a = ap.parse_args()
    rows = a.rows or [1_000_000, 10_000_000]
    head = f"{'rows':>11} | {'mode':<12} | {'partitions':>10} | {'seconds':>8} | {'rows/s':>11} | {'peak RSS':>9}"
    print(f"{head} | speed-up | same")
    with tempfile.TemporaryDirectory(prefix="bench-validate-") as tmp:
        work = Path(tmp)
        for n in rows:
            data = make_input(n, work)
            got: dict = {}
            for _ in range(a.rounds):  # in turn, so that a change in the machine's load hits both alike
                for partitioned in (False, True):
                    m = measure(params_for(work, data, partitioned))
                    assert m["rows"]["input"] == n, m
                    if partitioned not in got or m["seconds"] < got[partitioned]["seconds"]:
                        got[partitioned] = m
            for partitioned, m in got.items():
                speed = "" if not partitioned else f"{got[False]['seconds'] / m['seconds']:.2f}x"
                print(
                    f"{n:>11,} | {m['checked']['mode']:<12} | {m['checked']['partitions']:>10} | "
                    f"{m['seconds']:>8.1f} | {n / m['seconds']:>11,.0f} | {m['peak_rss_gib']:>5.2f} GiB | "
                    f"{speed:>8} | {same(work) if partitioned else ''}",
                    flush=True,
                )
            for p in [*work.glob(f"*{n}*"), work / "in-memory", work / "partitioned"]:
                subprocess.run(["rm", "-rf", str(p)])


if __name__ == "__main__":
    main()
