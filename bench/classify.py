"""Classification on Adult census income: Trainflow's shipped config against the model a user would otherwise
pick, scikit-learn's HistGradientBoostingClassifier, on the same split, in one run.

Run: .venv/bin/python bench/classify.py   (about 2 minutes on 2 cores)

The Adult config (data/datasets/adult.yaml) over params.yaml's other sections, in a temporary directory: each
stage (ingest, validate, preprocess, train, evaluate) in a fresh process, its wall time and peak memory (the
process and its children: Dask workers, DDP ranks). HistGradientBoosting then fits on the same train rows
(early stopping on the same validation rows, the categorical columns as categories) and is scored on the same
test rows with the same metric code (tasks/metrics.py).
"""

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from measure import measured  # noqa: E402

STAGES = ("ingest", "validate", "preprocess", "train", "evaluate")
SHOWN = ("roc_auc", "accuracy", "balanced_accuracy", "f1_macro", "log_loss", "ece")


def settings(work: str):
    import yaml

    from tasks.settings import PATH_KEYS, parse_settings

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["dataset"] = yaml.safe_load((ROOT / "data" / "datasets" / "adult.yaml").read_text())["dataset"]
    for section, key in PATH_KEYS:
        if raw.get(section, {}).get(key) is not None:
            raw[section][key] = str((ROOT if section == "dataset" else Path(work)) / raw[section][key])
    raw["evaluate"]["primary"] = "roc_auc"
    return parse_settings(raw, root=work)


def stage(work: str, name: str) -> dict:
    import importlib
    import time

    s = settings(work)
    fn = getattr(importlib.import_module(f"tasks.{name}"), name)
    t0 = time.perf_counter()
    out = fn(s)
    result = {"work_s": time.perf_counter() - t0}
    if name == "evaluate":
        result["metrics"] = {k: out[k] for k in SHOWN if k in out}
        result["n"] = out.get("n")
    return result


def boosting(work: str) -> dict:
    import json
    import time

    import numpy as np
    from sklearn.ensemble import HistGradientBoostingClassifier

    from tasks.metrics import task_metrics
    from tasks.training.data import load_split

    s = settings(work)
    feat = Path(s.preprocess.out_dir)
    schema = json.loads((feat / "schema.json").read_text())
    split = {n: load_split(feat / n, schema["features"], schema["target"]) for n in ("train", "val", "test")}
    x, y = (t.numpy() for t in split["train"])
    xv, yv = (t.numpy() for t in split["val"])
    xt, yt = (t.numpy() for t in split["test"])
    categorical = np.zeros(x.shape[1], bool)
    categorical[[c["index"] for c in schema["categorical"]]] = True
    model = HistGradientBoostingClassifier(categorical_features=categorical, early_stopping=True, random_state=0)
    t0 = time.perf_counter()
    model.fit(x, y.astype(int), X_val=xv, y_val=yv.astype(int))
    fit_s = time.perf_counter() - t0
    p = model.predict_proba(xt)
    metrics = task_metrics(yt.astype(int), p)
    return {"work_s": fit_s, "metrics": {k: metrics[k] for k in SHOWN if k in metrics}, "iterations": model.n_iter_}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-classify-") as work:
        code = "import json, sys, classify as b; print(json.dumps(b.{}(*sys.argv[1:])))"
        rows = {name: measured(code.format("stage"), work, name) for name in STAGES}
        hgb = measured(code.format("boosting"), work)
    mlp = rows["evaluate"]["metrics"]
    print(f"Adult census income, test split ({rows['evaluate']['n']:,} rows of 48,842), one run")
    print(f"{'metric':<18}{'Trainflow MLP':>15}{'HistGradientBoosting':>22}")
    for k in SHOWN:
        if k in mlp:
            print(f"{k:<18}{mlp[k]:>15.4f}{hgb['metrics'][k]:>22.4f}")
    print(f"\n{'stage':<12}{'work s':>8}{'peak GiB':>10}")
    for name, r in rows.items():
        print(f"{name:<12}{r['work_s']:>8.1f}{r['peak_rss_gib']:>10.2f}")
    total = sum(r["work_s"] for r in rows.values())
    print(f"{'all stages':<12}{total:>8.1f}{max(r['peak_rss_gib'] for r in rows.values()):>10.2f}")
    print(f"{'HGB fit':<12}{hgb['work_s']:>8.1f}{hgb['peak_rss_gib']:>10.2f}   ({hgb['iterations']} iterations)")


if __name__ == "__main__":
    main()
