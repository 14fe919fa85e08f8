"""The capacity model of docs/scale-out.md: per-stage rates measured here, a model of one loop's time fitted on
a few points and checked against others, then used to size 10x, 100x and 1000x the data on N GPU workers.

Run: .venv/bin/python bench/capacity.py                (about 17 minutes on 2 cores)
     .venv/bin/python bench/capacity.py --only-train   (the training part alone, on 1M rows; about 4 minutes)

The model (n rows, W Dask workers, N = 2 training ranks here, global batch B, M MB of gradients):
    validate(n, W)   = c_v + n / (W * r_v)      r: rows per CPU-second of one single-threaded worker process
    preprocess(n, W) = c_p + n / (W * r_p)      c: the stage's start; each worker process adds c_w CPU-seconds
    step(B, N)       = t0 + (B / N) / s + a + b * M
                                                s: samples/s of one rank, t0: a step's fixed cost, a + b*M: one
                                                all-reduce of the gradients
Measured, each in a fresh process, on California Housing grown with bench/scale_up.py:
  - validate (partitioned) and preprocess on 1 worker at the two smallest sizes and on 2 at the second: fits c, r
    and c_w; then 1 and 2 workers at the largest size, checked against the model in CPU-seconds and wall seconds;
  - all-reduce seconds per MB: 2 gloo ranks, float32 tensors of 0.25 to 16 MB (fits a and b);
  - training, 2 gloo ranks: t0 and s from 5 epochs on the real 20,640 rows at batches 256 and 1,024; then one
    epoch on the features of the smallest size at batches 256, 512 and 1,024, checked against the model.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from measure import measured  # noqa: E402
from validate import make_input  # noqa: E402


def settings(work: str, workers: str = "1", **train):
    import yaml

    from tasks.settings import PATH_KEYS, parse_settings

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, key in PATH_KEYS:
        raw[section][key] = str(ROOT / raw[section][key]) if section == "dataset" else str(Path(work) / raw[section][key])
    raw["validate"].update(in_memory_max_rows=0, drift="off")
    raw["dask"].update(n_workers=int(workers), threads_per_worker=1, processes=True)  # a worker = a host's process
    raw["train"].update({"patience": 10**6, "checkpoint_every": "1000 epochs", **train})
    return parse_settings(raw, root=work)


def stage(name: str, work: str, workers: str) -> dict:
    import time

    from tasks.preprocess import preprocess
    from tasks.validate import validate

    s = settings(work, workers)
    t, cpu = time.perf_counter(), cpu_seconds()
    {"validate": validate, "preprocess": preprocess}[name](s)
    return {"seconds": time.perf_counter() - t, "cpu_s": cpu_seconds() - cpu}


def cpu_seconds() -> float:
    """CPU time of this process and of every child it has waited for (the local cluster's workers, once closed)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def real_features(work: str) -> dict:
    from tasks.ingest import ingest
    from tasks.preprocess import preprocess
    from tasks.validate import validate

    s = settings(work)
    for step in (ingest, validate, preprocess):
        step(s)
    return {"ok": True}


def train(work: str, batch: str, epochs: str) -> dict:
    """2 ranks; the mean epoch's training-step seconds (its validation pass left out), the time split per rank."""
    from tasks.train import train

    s = settings(work, world_size=2, batch_size=int(batch), epochs=int(epochs))
    summary = train(s)
    n_train = json.loads((Path(s.preprocess.out_dir) / "schema.json").read_text())["rows"]["train"]
    steps_s = sum(n_train / e["samples_per_s"] for e in summary["epochs"]) / len(summary["epochs"])
    return {"n_train": n_train, "epoch_s": steps_s, "split": summary["time_split_s"]}


def model_mb(work: str) -> dict:
    from tasks.training.model import load_model

    model, _ = load_model(Path(work) / "models/train/model.pt")
    return {"mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}


def allreduce() -> dict:
    """Median seconds of one all-reduce of a float32 tensor of each size, 2 gloo ranks on this machine."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_allreduce_rank, args=(tmp,), nprocs=2)
        return json.loads((Path(tmp) / "times.json").read_text())


def _allreduce_rank(rank: int, tmp: str) -> None:
    import os
    import time

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    times = {}
    for mb in (0.25, 1, 4, 16):
        x = torch.ones(int(mb * 2**20 / 4))
        samples = []
        for _ in range(25):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(x)
            samples.append(time.perf_counter() - t)
        times[mb] = sorted(samples)[len(samples) // 2]
    if rank == 0:
        (Path(tmp) / "times.json").write_text(json.dumps(times))
    dist.destroy_process_group()


def run(fn: str, *args: str) -> dict:
    return measured(f"import json, sys, capacity as b; print(json.dumps(b.{fn}(*sys.argv[1:])))", *args)


def line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def err(predicted: float, measured_s: float) -> str:
    return (
        f"predicted {predicted:6.1f} s, measured {measured_s:6.1f} s, error {100 * (predicted - measured_s) / measured_s:+5.1f} %"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, action="append", help="sizes (repeatable): the two smallest fit; default 2M, 8M, 20M")
    ap.add_argument("--only-train", action="store_true", help="the training part alone, on 1M rows")
    a = ap.parse_args()
    if a.only_train:
        with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp:
            big = Path(tmp) / "big"
            (big / "data/raw").mkdir(parents=True)
            os.link(make_input(1_000_000, Path(tmp)), big / "data/raw/data.parquet")
            run("stage", "validate", str(big), "1")
            run("stage", "preprocess", str(big), "1")
            training(Path(tmp), big)
        return
    rows = sorted(a.rows or [2_000_000, 8_000_000, 20_000_000])
    fit_rows, check_rows = rows[:2], rows[2:]
    print(f"load average at the start: {os.getloadavg()} ({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp:
        work = Path(tmp)
        data = {n: make_input(n, work) for n in rows}
        rates = {}
        for name in ("validate", "preprocess"):
            runs = {}
            for n in rows:
                for w in (1, 2):
                    if w == 2 and n == fit_rows[0]:
                        continue
                    if name == "preprocess":  # in a copy (hard links) of what validate wrote for these rows
                        out = work / f"p-{n}-{w}"
                        shutil.copytree(work / f"v-{n}", out, copy_function=os.link)
                    else:  # the scaled-up rows as the ingest stage's output (a hard link)
                        out = work / (f"v-{n}" if w == 1 else f"v-{n}-{w}")
                        (out / "data/raw").mkdir(parents=True)
                        os.link(data[n], out / "data/raw/data.parquet")
                    runs[n, w] = run("stage", name, str(out), str(w))
                    m = runs[n, w]
                    print(f"{name:<10} {n:>11,} rows, {w} worker(s): {m['seconds']:6.1f} s, {m['cpu_s']:6.1f} CPU-s", flush=True)
            # wall: c + n / (W r), fitted on 1 worker; CPU: c0 + W c_w + n / r_cpu, c_w from one more worker at the
            # second size (each worker process imports and starts on its own)
            c, per_row = line(list(fit_rows), [runs[n, 1]["seconds"] for n in fit_rows])
            c1, cpu_per_row = line(list(fit_rows), [runs[n, 1]["cpu_s"] for n in fit_rows])
            c_w = runs[fit_rows[1], 2]["cpu_s"] - runs[fit_rows[1], 1]["cpu_s"]
            rates[name] = (c, 1 / cpu_per_row)  # a worker with a core of its own does 1 / cpu_per_row rows/s
            print(
                f"{name}: wall c = {c:.1f} s, r = {1 / per_row:,.0f} rows/s; CPU c0 = {c1 - c_w:.1f} CPU-s, c_w = "
                f"{c_w:.1f} CPU-s per worker, r = {1 / cpu_per_row:,.0f} rows per CPU-s (fitted on {fit_rows} rows)"
            )
            for (n, w), m in sorted(runs.items()):
                if n in check_rows or (w == 2 and n != fit_rows[1]):
                    print(f"    {n:>11,} rows, {w} worker(s): wall {err(c + n * per_row / w, m['seconds'])}")
                    print(f"    {n:>11,} rows, {w} worker(s): CPU  {err(c1 + (w - 1) * c_w + n * cpu_per_row, m['cpu_s'])}")

        training(work, work / f"p-{fit_rows[0]}-1")
        print(json.dumps({"rates": rates}))
        print(f"load average at the end: {os.getloadavg()}")
        sizing(rates)


def training(work: Path, big: Path) -> None:
    """A step of 2 ranks: t0 + B / (2 s) + (a + b M); a, b from the all-reduce alone, t0 and s fitted on the real
    rows at two batch sizes, then an epoch on the features in `big` checked at three."""
    ar = {k: v for k, v in run("allreduce").items() if k != "peak_rss_gib"}
    a, b = line([float(k) for k in ar], list(ar.values()))
    print(f"all-reduce, 2 gloo ranks: {a * 1e3:.2f} ms + {b * 1e3:.2f} ms/MB  ({ar})")
    small = work / "real"
    run("real_features", str(small))
    runs = {batch: run("train", str(small), str(batch), "5") for batch in (256, 1024)}
    mb = run("model_mb", str(small))["mb"]
    sync = a + b * mb
    step = {batch: m["epoch_s"] / math.ceil(m["n_train"] / batch) - sync for batch, m in runs.items()}
    t0, per_sample = line(list(step), list(step.values()))
    s = 1 / (2 * per_sample)
    print(f"train: s = {s:,.0f} samples/s per rank, t0 = {t0 * 1e3:.2f} ms a step, all-reduce ({mb:.2f} MB) {sync * 1e3:.2f} ms")
    for batch in (256, 512, 1024):
        m = run("train", str(big), str(batch), "1")
        predicted = math.ceil(m["n_train"] / batch) * (t0 + batch / (2 * s) + sync)
        print(f"    epoch on {m['n_train']:,} training rows, batch {batch}: {err(predicted, m['epoch_s'])}")


# GPU figures for sizing, not measured on this machine: per-GPU samples/s of the train stage on one H200 (fp32,
# batch 4,096, resmlp 4x512 on flights-shaped rows: docs/benchmarks.md), that model's gradients (4 blocks of two
# 512x512 layers, ~2.1M parameters), and NCCL ring all-reduce between nodes at an assumed bus bandwidth.
GPU_SAMPLES_S, GPU_BATCH, GPU_MODEL_MB = 770_000, 4096, 8.4
NCCL_LATENCY_S, NCCL_GB_S = 50e-6, 20.0  # 200 Gb/s InfiniBand: ~20 GB/s bus bandwidth (assumed)
EPOCHS, CPU_WORKERS_PER_GPU = 20, 8


def sizing(rates: dict, base: int = 1_000_000) -> None:
    """Loop time for 10x, 100x, 1000x `base` rows on N GPU workers (and 8 CPU Dask workers per GPU worker)."""
    print(f"sizing: {EPOCHS} epochs, {GPU_BATCH:,} rows per GPU per step, {CPU_WORKERS_PER_GPU} CPU Dask workers per GPU")
    print(f"{'rows':>14} | {'GPUs':>4} | {'validate':>9} | {'preprocess':>10} | {'epoch':>8} | {'loop':>9}")
    for scale in (10, 100, 1000):
        n = scale * base
        for gpus in (1, 8, 32):
            w = CPU_WORKERS_PER_GPU * gpus
            v, p = (c + n / (w * r) for c, r in (rates["validate"], rates["preprocess"]))
            n_train = 0.64 * n
            steps = n_train / (GPU_BATCH * gpus)
            sync = 0.0 if gpus == 1 else NCCL_LATENCY_S + 2 * (gpus - 1) / gpus * GPU_MODEL_MB / 1024 / NCCL_GB_S
            epoch = steps * (GPU_BATCH / GPU_SAMPLES_S + sync)
            loop = v + p + EPOCHS * epoch
            print(f"{n:>14,} | {gpus:>4} | {v:>7.0f} s | {p:>8.0f} s | {epoch:>6.1f} s | {loop / 60:>5.1f} min")


if __name__ == "__main__":
    main()
