"""The train stage's throughput: against a bare PyTorch loop, 1 vs 2 ranks, and each gradient-sync mode.

Run: .venv/bin/python bench/train.py                 (about 6 minutes on 2 cores)
     .venv/bin/python bench/train.py --epochs 5

On California Housing (features from the real preprocess stage, default params, early stopping off), each
run in a fresh process:
  (a) the train stage with 1 rank vs a hand-written loop with the same model, data, batches, optimizer,
      schedule and threads, and the validation loss once per epoch that early stopping needs, and nothing
      else (no checkpoints, metrics or step timing);
  (b) the train stage with 1 rank, 2 DDP ranks and 2 FSDP ranks (gloo on CPU);
  (c) 2 ranks with each train.grad_sync mode, with the test RMSE of the model it trained.
samples/s is training rows × epochs ÷ the wall time of the epochs.
"""

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from measure import measured  # noqa: E402


def settings(work: str, **train):
    import yaml

    from tasks.settings import PATH_KEYS, parse_settings

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, key in PATH_KEYS:
        raw[section][key] = str(ROOT / raw[section][key]) if section == "dataset" else str(Path(work) / raw[section][key])
    raw["train"].update({"patience": 10**6, **train})
    return parse_settings(raw, root=work)


def prepare(work: str) -> dict:
    from tasks.ingest import ingest
    from tasks.preprocess import preprocess
    from tasks.validate import validate

    s = settings(work)
    for stage in (ingest, validate, preprocess):
        stage(s)
    return {"ok": True}


def stage(work: str, epochs: str, world_size: str, grad_sync: str, strategy: str = "ddp") -> dict:
    from tasks.evaluate import evaluate
    from tasks.train import train

    s = settings(work, epochs=int(epochs), world_size=int(world_size), grad_sync=grad_sync, strategy=strategy)
    summary = train(s)
    return {"samples_per_s": summary["samples_per_s"], "rmse": evaluate(s)["rmse"], "split": summary["time_split_s"]}


def bare(work: str, epochs: str) -> dict:
    """The same training as one rank of the stage, written as plainly as possible."""
    import json
    import os
    import time

    import torch

    from tasks.training.data import load_split
    from tasks.training.model import build_model

    s = settings(work, epochs=int(epochs))
    cfg, feat = s.train, Path(s.preprocess.out_dir)
    schema = json.loads((feat / "schema.json").read_text())
    t = json.loads((feat / "transform.json").read_text())
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    x, y = load_split(feat / "train", schema["features"], schema["target"])
    xv, yv = load_split(feat / "val", schema["features"], schema["target"])
    y, yv = (y - t["target_mean"]) / t["target_std"], (yv - t["target_mean"]) / t["target_std"]
    model = build_model(
        {
            "n_features": len(schema["features"]),
            "hidden": list(cfg.hidden),
            "dropout": cfg.dropout,
            "categorical": schema["categorical"],
        }
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    order = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=order)
        for start in range(0, len(x), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            loss = (model(x[idx]) - y[idx]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        model.eval()  # the validation loss every loop with early stopping computes
        with torch.no_grad():
            float((model(xv) - yv).pow(2).mean())
    return {"samples_per_s": cfg.epochs * len(x) / (time.perf_counter() - t0)}


def run(fn: str, *args: str) -> dict:
    return measured(f"import json, sys, train as b; print(json.dumps(b.{fn}(*sys.argv[1:])))", *args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="pairs of (a)")
    ap.add_argument("--only-a", action="store_true", help="just (a)")
    a = ap.parse_args()
    e = str(a.epochs)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as work:
        run("prepare", work)
        print(f"(a) California Housing, {e} epochs, 1 process; bare loop and stage alternately, {a.repeats} times each")
        ratios = []
        for _ in range(a.repeats):  # side by side: this machine's speed drifts between runs
            loop = run("bare", work, e)
            one = run("stage", work, e, "1", "allreduce")
            ratios.append(one["samples_per_s"] / loop["samples_per_s"])
            print(
                f"    bare loop {loop['samples_per_s']:>10,.0f}   train stage {one['samples_per_s']:>10,.0f} samples/s   "
                f"stage / bare = {ratios[-1]:.3f}",
                flush=True,
            )
        print(f"    median stage / bare = {sorted(ratios)[len(ratios) // 2]:.3f}")
        if a.only_a:
            return
        print("(b) ranks (gloo); step time split over the run: data / compute / gradient sync, seconds per rank")
        two = run("stage", work, e, "2", "allreduce")
        fsdp = run("stage", work, e, "2", "allreduce", "fsdp")
        for name, m in (("1 rank", one), ("2 ranks ddp", two), ("2 ranks fsdp", fsdp)):
            split = " / ".join(f"{m['split'][k]:.2f}" for k in ("data", "compute", "sync"))
            print(f"    {name:<13}{m['samples_per_s']:>10,.0f} samples/s   test RMSE {m['rmse']:.4f}   split {split}")
        print("(c) train.grad_sync, 2 ranks")
        for mode in ("allreduce", "fp16", "bf16", "powersgd", "local_sgd"):
            m = two if mode == "allreduce" else run("stage", work, e, "2", mode)
            split = " / ".join(f"{m['split'][k]:.2f}" for k in ("data", "compute", "sync"))
            print(
                f"    {mode:<10}   {m['samples_per_s']:>10,.0f} samples/s   test RMSE {m['rmse']:.4f}   split {split}", flush=True
            )


if __name__ == "__main__":
    main()
