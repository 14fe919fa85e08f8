"""Hyperparameter search on California Housing: the search's best model against the shipped config and
HistGradientBoosting, and the speed-up of 2 Dask workers over 1.

Run: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/search.py              (about 8 minutes on 2 shared cores)
     OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/search.py --trials 8 --epochs 20

The real ingest, validate and preprocess stages once (params.yaml's sections), then, each in a fresh process:
  (a) the shipped config: the train stage, then evaluate (its test RMSE);
  (b) HistGradientBoostingRegressor (defaults, early stopping on the same validation rows) on the same
      preprocessed split (bench/quality.py's);
  (c) the search (tasks/search.py: params.yaml's search section, --trials trials of at most --epochs epochs, 2 local
      workers): its wall time, its trials' states, and the best trial's model scored on the test rows;
  (d) the same 4 trials (the shipped values, enqueued; pruner none) on 1 and on 2 workers: the speed-up.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from measure import measured  # noqa: E402
from quality import settings  # noqa: E402
from train import prepare  # noqa: E402,F401  (ingest, validate, preprocess into the work dir)


def study(work: str, name: str, trials: str, workers: str, epochs: str, fixed: str) -> dict:
    """A search in `work`; with `fixed`, that many trials of the shipped values and no pruner (equal work)."""
    from tasks.evaluate import evaluate
    from tasks.search import open_study, search, trials_root
    from tasks.settings import parse_settings

    raw = settings(work).model_dump(by_alias=True)
    raw["train"]["epochs"] = int(epochs)
    raw["search"].update(
        n_trials=int(trials), workers=int(workers), study=name, storage=f"{work}/{name}/study.db", out_dir=f"{work}/{name}/report"
    )
    if int(fixed):
        raw["search"]["pruner"] = "none"
    s = parse_settings(raw, root=work)
    if int(fixed):
        shipped = {k: raw[k.split(".")[0]][k.split(".")[1]] for k in s.search.space}
        for _ in range(int(fixed)):
            open_study(s.search).enqueue_trial(shipped, skip_if_exists=False)
    t0 = time.perf_counter()
    summary = search(s)
    wall = time.perf_counter() - t0
    best = summary["best"]
    raw["train"]["out_dir"] = str(trials_root(s.search) / f"trial-{best['number']:04d}" / "model")
    raw["evaluate"].update(out_dir=f"{work}/{name}/eval", champion=f"{work}/{name}/production")
    rmse = evaluate(parse_settings(raw, root=work))["rmse"]
    return {"wall_s": wall, "states": summary["states"], "best": best, "test_rmse": rmse}


def run(fn: str, *args: str) -> dict:
    return measured(f"import json, sys, search as b; print(json.dumps(b.{fn}(*sys.argv[1:])))", *args)


def quality(fn: str, *args: str) -> dict:
    return measured(f"import json, sys, quality as b; print(json.dumps(b.{fn}(*sys.argv[1:])))", *args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=12, help="trials of the search (c)")
    ap.add_argument("--epochs", type=int, default=30, help="train.epochs of each trial (the shipped config keeps its own)")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="trainflow-bench-search-") as work:
        quality("prepare", work)
        t0 = time.perf_counter()
        default = quality("stage", work, json.dumps({"name": "default"}))
        wall = time.perf_counter() - t0
        rows.append(("shipped config (train + evaluate)", default["rmse"], wall, f"{default['epochs']} epochs"))
        t0 = time.perf_counter()
        hgb = quality("boosting", work)
        note = f"{hgb['iterations']} iterations, fit {hgb['train_s']:.1f} s"
        rows.append(("HistGradientBoosting", hgb["rmse"], time.perf_counter() - t0, note))
        t0 = time.perf_counter()
        found = run("study", work, "search", str(a.trials), "2", str(a.epochs), "0")
        states = ", ".join(f"{n} {k.lower()}" for k, n in found["states"].items())
        best = ", ".join(f"{k.split('.')[1]}={v:.3g}" for k, v in found["best"]["params"].items())
        rows.append((f"search, 2 workers: best of {a.trials}", found["test_rmse"], time.perf_counter() - t0, f"{states}; {best}"))
        speed = {w: run("study", work, f"fixed{w}", "4", w, "20", "4") for w in ("1", "2")}
    print(f"\nCalifornia Housing, test RMSE (target in $100k) and wall seconds (fresh process each; {a.epochs}-epoch trials)\n")
    print(f"| {'run':<40} | test RMSE | wall s | notes |\n|---|---|---|---|")
    for name, rmse, wall, note in rows:
        print(f"| {name:<40} | {rmse:.4f} | {wall:.1f} | {note} |")
    one, two = speed["1"]["wall_s"], speed["2"]["wall_s"]
    print(f"\n4 equal trials (shipped values, 20 epochs, no pruning): 1 worker {one:.1f} s, 2 workers {two:.1f} s")
    print(f"speed-up of 2 workers over 1: ×{one / two:.2f}")


if __name__ == "__main__":
    main()
