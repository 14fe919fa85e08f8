"""Time to quality on California Housing: the shipped config against the one before it and against
HistGradientBoosting, on the same split, in one run.

Run: .venv/bin/python bench/quality.py            (about 4 minutes on 2 shared cores)
     .venv/bin/python bench/quality.py --repeats 2 (the two configs alternately, twice)

The real ingest, validate and preprocess stages once (params.yaml's preprocess section), then per config, each in
a fresh process: the train stage (params.yaml's train section, or OLD over it), then the evaluate stage. Reported:
the best model's test RMSE; the train stage's seconds (the call, in its process: data load, model, epochs,
writes); the seconds from the stage's start to the end of the first epoch whose validation RMSE is ≤ 0.50 (from
summary.json's per-epoch records: the epochs' start plus each epoch's seconds; "never" if none is); the peak
memory of the process. HistGradientBoostingRegressor (defaults, early stopping on the same validation rows) fits
the same preprocessed train rows and is scored on the same test rows.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from measure import measured  # noqa: E402
from train import prepare  # noqa: E402,F401  (ingest, validate, preprocess into the work dir, as bench/train.py does)

TARGET = 0.50  # the RMSE the time is measured to
# The train section before time-to-quality work (issue 18): these keys over params.yaml give it back.
OLD = {
    "model": "mlp",
    "hidden": [256, 256, 256],
    "dropout": 0.1,
    "batch_size": 256,
    "lr": 0.002,
    "epochs": 100,
    "patience": 15,
    "schedule": "cosine",
    "numeric_embedding": "none",
}


def settings(work: str, train: dict | None = None):
    import yaml

    from tasks.settings import PATH_KEYS, parse_settings

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, key in PATH_KEYS:
        if raw.get(section, {}).get(key) is not None:
            raw[section][key] = str((ROOT if section == "dataset" else Path(work)) / raw[section][key])
    raw["train"].update(train or {})
    return parse_settings(raw, root=work)


def stage(work: str, train: str) -> dict:
    """The train stage, then evaluate, with train.* overrides (JSON) in a directory of their own."""
    import time

    from tasks.evaluate import evaluate
    from tasks.train import train as train_stage

    overrides = json.loads(train)
    name = overrides.pop("name")
    raw = settings(work).model_dump(by_alias=True)
    out = Path(work) / name
    raw["train"].update(overrides, out_dir=str(out / "model"), log_dir=str(out / "live"))
    raw["evaluate"].update(out_dir=str(out / "eval"), champion=str(out / "production"))
    from tasks.settings import parse_settings

    s = parse_settings(raw, root=work)
    t0 = time.time()
    summary = train_stage(s)
    train_s = time.time() - t0
    reached, at = None, summary["epochs_wall"][0] - t0
    for e in summary["epochs"]:
        at += e["seconds"]
        if e["val_rmse"] <= TARGET:
            reached = at
            break
    return {
        "rmse": evaluate(s)["rmse"],
        "train_s": train_s,
        "to_target_s": reached,
        "epochs": summary["epochs_run"],
        "best_val_rmse": summary["best_val_rmse"],
    }


def boosting(work: str) -> dict:
    import time

    import numpy as np
    from sklearn.ensemble import HistGradientBoostingRegressor

    from tasks.training.data import load_split

    s = settings(work)
    feat = Path(s.preprocess.out_dir)
    schema = json.loads((feat / "schema.json").read_text())
    split = {n: [t.numpy() for t in load_split(feat / n, schema["features"], schema["target"])] for n in ("train", "val", "test")}
    (x, y), (xv, yv), (xt, yt) = split["train"], split["val"], split["test"]
    t0 = time.perf_counter()
    model = HistGradientBoostingRegressor(early_stopping=True, random_state=0).fit(x, y, X_val=xv, y_val=yv)
    fit_s = time.perf_counter() - t0
    rmse = float(np.sqrt(np.mean((model.predict(xt) - yt) ** 2)))
    return {"rmse": rmse, "train_s": fit_s, "iterations": int(model.n_iter_)}


def run(fn: str, *args: str) -> dict:
    return measured(f"import json, sys, quality as b; print(json.dumps(b.{fn}(*sys.argv[1:])))", *args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=1, help="runs of each config, alternately")
    a = ap.parse_args()
    import yaml

    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    configs = {"old default": OLD, "new default": {}}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as work:
        run("prepare", work)
        rows: dict[str, list[dict]] = {name: [] for name in configs}
        for i in range(a.repeats):  # side by side: this machine's speed drifts between runs
            for name, train in configs.items():
                rows[name].append(run("stage", work, json.dumps({**train, "name": f"{name.split()[0]}-{i}"})))
        hgb = run("boosting", work)
    print(f"California Housing, test split, one run ({a.repeats} run(s) per config; time to val RMSE ≤ {TARGET})")
    print(f"{'':<28}{'test RMSE':>10}{'train s':>9}{'to ≤0.50 s':>12}{'epochs':>8}{'peak GiB':>10}")
    for name, runs in rows.items():
        for r in runs:
            to = f"{r['to_target_s']:.1f}" if r["to_target_s"] is not None else "never"
            print(f"{name:<28}{r['rmse']:>10.4f}{r['train_s']:>9.1f}{to:>12}{r['epochs']:>8}{r['peak_rss_gib']:>10.2f}")
    print(
        f"{'HistGradientBoosting':<28}{hgb['rmse']:>10.4f}{hgb['train_s']:>9.1f}{'':>12}{hgb['iterations']:>8}{hgb['peak_rss_gib']:>10.2f}"
    )
    keys = ("model", "hidden", "batch_size", "lr", "epochs", "schedule", "numeric_embedding", "embedding_bins", "embedding_dim")
    print("new default: " + ", ".join(f"{k}={shipped.get(k)}" for k in keys))
    print("old default: " + ", ".join(f"{k}={v}" for k, v in OLD.items()))


if __name__ == "__main__":
    main()
