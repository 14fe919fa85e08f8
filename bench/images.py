"""Fashion-MNIST end to end: test accuracy against the published anchors, wall time and peak memory per stage.

Run: .venv/bin/python bench/images.py                (8 epochs: about 7 minutes on 2 idle cores, the train stage
                                                      ~42 s an epoch; needs dataset-fashion-mnist)
     .venv/bin/python bench/images.py --epochs 1     (a look at the stage times)

The shipped dataset (data/datasets/fashion_mnist.yaml: the 70,000 images of the IDX files, the t10k images as the
test split, the rest 80/20 into train and validation) with the train section `trainflow use fashion_mnist` gives
(cnn [32, 64]) and params.yaml's other train values, early stopping off. Each stage runs in a fresh process in a
temporary workspace; peak memory is the resident set of the process and all its children (Dask workers, ranks).
Anchors (test accuracy): the best scikit-learn model in the dataset's paper 0.897, a 2-conv CNN ≈ 0.916.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from measure import measured  # noqa: E402

STAGES = ("ingest", "validate", "preprocess", "train", "evaluate", "package")
ANCHORS = {"best scikit-learn model (Xiao et al. 2017)": 0.897, "2-conv CNN (published)": 0.916}


def settings(work: str, train: str):
    import yaml

    from tasks.datasets import DATASETS, train_for
    from tasks.settings import PATH_KEYS, PRIMARY, parse_settings

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["dataset"] = yaml.safe_load((DATASETS / "fashion_mnist.yaml").read_text())["dataset"]
    raw["evaluate"]["primary"] = PRIMARY["multiclass"][0]  # as `trainflow use fashion_mnist` sets them
    for dotted, value in train_for("image", raw["train"]).items():
        raw["train"][dotted.split(".")[1]] = value
    for section, key in PATH_KEYS:
        raw[section][key] = str(ROOT / raw[section][key]) if section == "dataset" else str(Path(work) / raw[section][key])
    raw["train"].update({"patience": 10**6, **json.loads(train)})
    return parse_settings(raw, root=work)


def run_stage(work: str, train: str, name: str) -> dict:
    """One stage, timed inside its process (imports excluded); what it returned, reduced to numbers."""
    import importlib
    import time

    s = settings(work, train)
    fn = getattr(importlib.import_module(f"tasks.{name}"), name)
    t = time.perf_counter()
    out = fn(s)
    seconds = time.perf_counter() - t
    keep = ("rows", "accuracy", "balanced_accuracy", "f1_macro", "log_loss", "samples_per_s", "steps", "epochs")
    return {"seconds": seconds} | {k: v for k, v in (out or {}).items() if k in keep and not isinstance(v, list)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--figures", help="copy the evaluate stage's figures (confusion, misclassified, ...) into this folder")
    a = ap.parse_args()
    train = json.dumps({"epochs": a.epochs, "batch_size": a.batch_size, "world_size": a.world_size})
    s = settings(tempfile.gettempdir(), train)
    print(
        f"Fashion-MNIST ({s.dataset.source}); train.model {s.train.model} {s.train.hidden}, dropout {s.train.dropout}, "
        f"augment {s.train.augment}, {a.epochs} epochs of batch {a.batch_size}, lr {s.train.lr}, "
        f"{a.world_size} rank(s), {s.dask.n_workers or 'auto'} Dask workers",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-images-") as work:
        for name in STAGES:
            r = measured("import json, sys, images; print(json.dumps(images.run_stage(*sys.argv[1:])))", work, train, name)
            rows.append((name, r))
            print(f"  {name}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB", flush=True)
        summary = json.loads((Path(work) / "models/train/summary.json").read_text())
        if a.figures:
            shutil.copytree(Path(settings(work, train).evaluate.out_dir) / "figures", a.figures, dirs_exist_ok=True)
    metrics = dict(rows)["evaluate"]
    print("\n| stage | wall s | peak RSS GiB | throughput |\n|---|---:|---:|---|")
    for name, r in rows:
        what = ""
        if name in ("ingest", "preprocess"):
            what = f"{70_000 / r['seconds']:,.0f} images/s"
        elif name == "train":
            what = f"{summary['samples_per_s']:,.0f} samples/s ({summary['steps']:,} steps)"
        print(f"| {name} | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} | {what} |")
    total = sum(r["seconds"] for _, r in rows)
    print(f"| all | {total:.1f} | {max(r['peak_rss_gib'] for _, r in rows):.2f} | |")
    print(
        f"\ntest accuracy {metrics['accuracy']:.4f} (goal ≥ 0.91), balanced accuracy {metrics['balanced_accuracy']:.4f}, "
        f"macro-F1 {metrics['f1_macro']:.4f}, log-loss {metrics['log_loss']:.4f} on the 10,000 t10k images"
    )
    for what, value in ANCHORS.items():
        print(f"  vs {what}: {value:.3f} ({metrics['accuracy'] - value:+.4f})")


if __name__ == "__main__":
    main()
