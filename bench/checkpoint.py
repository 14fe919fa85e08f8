"""Checkpoints of the train stage: write time and size for the default model, and what checkpointing costs
in samples/s.

Run: .venv/bin/python bench/checkpoint.py   (about 3 minutes on 2 cores)

California Housing, default params (MLP 3×256, AdamW), 20 epochs, 1 process, each run a fresh process:
checkpoints every 5 epochs (the default), every epoch, every 10 steps, and only at the end ('1000 epochs'),
each twice, interleaved.
"""

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from measure import measured  # noqa: E402
from train import run  # noqa: E402


def write(work: str) -> dict:
    """Time checkpoint.save of the default model after one training epoch (synchronously, 5 times)."""
    import time

    import torch
    from train import settings

    from tasks.train import train
    from tasks.training.checkpoint import save

    s = settings(work, epochs=1)
    train(s)

    state = torch.load(next(Path(s.train.out_dir, "checkpoints").glob("*.pt")), weights_only=True)
    times = []
    for i in range(5):
        t0 = time.perf_counter()
        path = save(Path(work) / "bench-ckpt", state | {"steps": i}, keep=5)
        times.append(time.perf_counter() - t0)
    return {"write_ms": sorted(times)[2] * 1000, "bytes": path.stat().st_size}


def stage(work: str, every: str) -> dict:
    from train import settings

    from tasks.train import train

    summary = train(settings(work, epochs=20, checkpoint_every=every))
    return {"samples_per_s": summary["samples_per_s"]}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as work:
        run("prepare", work)
        w = measured("import json, sys, checkpoint as b; print(json.dumps(b.write(sys.argv[1])))", work)
        print(
            f"checkpoint of the default model (weights, AdamW state, best weights, RNG, history): "
            f"{w['bytes'] / 1e6:.2f} MB, written in {w['write_ms']:.1f} ms (temp file + rename + sha256)"
        )
        rows = {}
        for every in ("1000 epochs", "5 epochs", "1 epoch", "10 steps") * 2:  # twice, interleaved
            r = measured("import json, sys, checkpoint as b; print(json.dumps(b.stage(*sys.argv[1:])))", work, every)
            rows.setdefault(every, []).append(r["samples_per_s"])
        base = max(rows["1000 epochs"])
        for every, v in rows.items():
            print(
                f"checkpoint every {every:<12} {max(v):>10,.0f} samples/s   {max(v) / base:.3f} of checkpointing only at the end"
            )


if __name__ == "__main__":
    main()
