"""The train stage on one GPU: samples/s at several batch sizes, bf16 vs fp32, peak GPU memory; torch.compile;
the NCCL process-group path (DDP with the timed all-reduce hook, and FSDP) through torchrun.

Run: bash bench/train_gpu.sh                    (under 5 minutes on one H100/H200)
     bash bench/train_gpu.sh --rows 20000 --epochs 2 --json out.json   (a smoke run; works on CPU too)

Data: synthetic features shaped like the preprocess stage's output for flights (24 numeric columns and 4
categorical code columns of 20 to 5,000 categories, embedded by the model), so the run needs no dataset.
Each configuration runs the stage's own training loop (tasks.train.run_rank) in this process; samples/s is
the training rows of the last epoch over its step time (the first epoch pays CUDA/compile warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CARDINALITIES = [20, 100, 1000, 5000]
N_NUMERIC = 24


def make_features(directory: Path, rows: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    names = [f"x{i}" for i in range(N_NUMERIC)] + [f"c{i}" for i in range(len(CARDINALITIES))]
    w = rng.normal(size=N_NUMERIC).astype(np.float32)
    for split, n in (("train", rows), ("val", max(1000, rows // 10))):
        x = rng.normal(size=(n, N_NUMERIC)).astype(np.float32)
        codes = [rng.integers(0, c, size=n).astype(np.float32) for c in CARDINALITIES]
        y = x @ w + np.sin(x[:, 0] * x[:, 1]) + sum(np.cos(c) for c in codes) + rng.normal(scale=0.1, size=n)
        cols = {name: col for name, col in zip(names, [*x.T, *codes])}
        cols["y"] = y.astype(np.float32)
        (directory / split).mkdir(parents=True)
        pq.write_table(pa.table(cols), directory / split / "part-0.parquet", row_group_size=1 << 20)
    categorical = [{"name": f"c{i}", "index": N_NUMERIC + i, "cardinality": c} for i, c in enumerate(CARDINALITIES)]
    (directory / "schema.json").write_text(
        json.dumps(
            {
                "dataset": "synthetic",
                "task": "regression",
                "features": names,
                "target": "y",
                "n_features": len(names),
                "categorical": categorical,
                "rows": {"train": rows, "val": max(1000, rows // 10), "test": 0},
            }
        )
    )
    (directory / "transform.json").write_text(json.dumps({"target_mean": 0.0, "target_std": float(np.sqrt(len(w)))}))


def settings(work: Path, **train):
    import yaml

    from tasks.settings import PATH_KEYS, parse_settings

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, key in PATH_KEYS:
        raw[section][key] = str(work / raw[section][key])
    raw["preprocess"]["out_dir"] = str(work / "features")
    raw["train"].update({"patience": 10**6, "model": "resmlp", "hidden": [512] * 4, "dropout": 0.0, **train})
    return parse_settings(raw)


def one_run(work: Path, rank: int = 0, world: int = 1, init: str = "", **train) -> dict:
    """The stage's loop for one configuration; its summary (last epoch's figures) and peak GPU memory."""
    import torch

    from tasks.training.checkpoint import staging_dir
    from tasks.training.loop import run_rank

    s = settings(work, **train)
    if rank == 0:  # a fresh run directory
        shutil.rmtree(staging_dir(s.train.out_dir), ignore_errors=True)
        staging_dir(s.train.out_dir).mkdir(parents=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run_rank(s, rank, world, int(os.environ.get("LOCAL_RANK", 0)), init, log=False)
    summary = json.loads((staging_dir(s.train.out_dir) / "summary.json").read_text()) if rank == 0 else {}
    last = summary.get("epochs", [{}])[-1]
    return {
        **{k: train[k] for k in ("batch_size", "precision")},
        "samples_per_s": last.get("samples_per_s"),
        "data_s": last.get("data_s"),
        "compute_s": last.get("compute_s"),
        "sync_s": last.get("sync_s"),
        "val_rmse": last.get("val_rmse"),
        "gpu_peak_gib": summary.get("gpu_peak_memory_gib"),
        "device": summary.get("device"),
        "precision": summary.get("precision"),
    }


def bare(work: Path, batch_size: int, epochs: int, precision: str, hidden: list[int] | None = None) -> dict:
    """The same model, data and optimizer as one_run in a hand-written loop, with nothing else."""
    import time

    import torch

    from tasks.training.data import load_split
    from tasks.training.model import build_model

    feat = work / "features"
    schema = json.loads((feat / "schema.json").read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = (t.to(device) for t in load_split(feat / "train", schema["features"], schema["target"]))
    torch.manual_seed(0)
    model = build_model(
        {
            "model": "resmlp",
            "n_features": len(schema["features"]),
            "hidden": hidden or [512] * 4,
            "dropout": 0.0,
            "categorical": schema["categorical"],
        }
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.002, weight_decay=0.01, fused=True)
    order = torch.Generator().manual_seed(0)
    bf16 = precision == "bf16"
    for _ in range(epochs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        perm = torch.randperm(len(x), generator=order).to(device)
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(x[idx])
            loss = (out.float() - y[idx]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {
        "batch_size": batch_size,
        "precision": precision,
        "samples_per_s": len(x) / seconds,
        "data_s": None,
        "compute_s": seconds,
        "sync_s": None,
        "val_rmse": None,
        "gpu_peak_gib": None,
    }


def under_torchrun(work: Path, strategy: str, batch_size: int, epochs: int) -> dict:
    """One rank started by torchrun: the NCCL (gloo on CPU) process group, DDP's timed hook or FSDP."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=1",
            __file__,
            "--rank",
            "--work",
            str(work),
            "--strategy",
            strategy,
            "--batch-size",
            str(batch_size),
            "--epochs",
            str(epochs),
            "--json",
            out.name,
        ]
        subprocess.run(
            cmd, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        )
        return json.loads(Path(out.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-sizes", default="1024,4096,16384")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)  # one torchrun rank
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=4096, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank:
        row = one_run(
            Path(a.work),
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            "env://",
            strategy=a.strategy,
            batch_size=a.batch_size,
            epochs=a.epochs,
            precision="auto",
        )
        Path(a.json).write_text(json.dumps(row))
        return

    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU)"
    print(f"device: {gpu} · torch {torch.__version__} · {a.rows:,} training rows · resmlp 4×512 + 4 embeddings", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-gpu-") as tmp:
        work = Path(tmp)
        make_features(work / "features", a.rows)
        print(
            f"{'run':<28}{'batch':>7}{'samples/s':>13}{'data s':>9}{'compute s':>11}{'sync s':>9}{'GPU GiB':>9}{'val RMSE':>10}"
        )

        def show(name: str, run, *args, **kwargs) -> None:
            try:
                row = run(*args, **kwargs)
            except Exception as e:  # one failed configuration does not lose the others' figures
                print(f"{name:<28}failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                rows.append({"run": name, "error": f"{type(e).__name__}: {e}"})
                return
            rows.append({"run": name, **row})
            f = lambda v, spec: format(v, spec) if v is not None else "-"
            print(
                f"{name:<28}{row['batch_size']:>7}{f(row['samples_per_s'], ',.0f'):>13}{f(row['data_s'], '.3f'):>9}"
                f"{f(row['compute_s'], '.3f'):>11}{f(row['sync_s'], '.3f'):>9}{f(row['gpu_peak_gib'], '.2f'):>9}"
                f"{f(row['val_rmse'], '.4f'):>10}",
                flush=True,
            )

        sizes = [int(b) for b in a.batch_sizes.split(",")]
        mid, top = sizes[len(sizes) // 2], sizes[-1]
        for batch in sizes:
            for precision in ("fp32", "bf16"):
                show(f"stage, {precision}", one_run, work, batch_size=batch, epochs=a.epochs, precision=precision)
        show("bare loop, fp32", bare, work, mid, a.epochs, "fp32")
        for precision in ("fp32", "bf16"):  # where matrix products dominate
            show(
                f"stage, {precision}, 4x2048 wide",
                one_run,
                work,
                batch_size=top,
                epochs=a.epochs,
                precision=precision,
                hidden=[2048] * 4,
            )
        for precision in ("fp32", "bf16"):
            show(
                f"stage, {precision}, compile",
                one_run,
                work,
                batch_size=mid,
                epochs=a.epochs + 1,
                precision=precision,
                compile=True,
            )
        for strategy in ("ddp", "fsdp"):
            show(f"torchrun 1 rank, {strategy}", under_torchrun, work, strategy, mid, a.epochs)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": gpu, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
