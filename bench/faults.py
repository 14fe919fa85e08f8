"""Injected faults on California Housing: how long until training resumed, how much work was lost, and the
final model against an uninterrupted run.

Run: .venv/bin/python bench/faults.py   (about 5 minutes on 2 cores)

2 gloo ranks (1 for the killed stage process), default model, 4 epochs of 52 steps, a checkpoint every 20
steps. Faults (tests/faults/fault_hook.py, real signals): rank 1 SIGKILLed at step 70; rank 0 hung at step 30
(train.step_timeout_s 5); rank 0 SIGKILLed at step 90 with no restarts allowed, the newest checkpoint then
truncated and the run started again; the stage process SIGKILLed at step 110 and started again. Under
torchrun, rank 1 SIGKILLed at step 70. Under the Dask launcher (a local `dask scheduler` and two
`dask worker --resources GPU=1`), the worker process running rank 1 SIGKILLed at step 70: replaced by its
nanny, or, without nannies, the run going on with 1 rank (train.elastic, rejoin_timeout_s 2).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RUN = dict(world_size=2, epochs=4, checkpoint_every="20 steps", patience=100)


def main() -> None:
    import yaml
    from train import prepare, settings

    from tasks.settings import UserError, parse_settings
    from tasks.train import train
    from tasks.training.checkpoint import listed, staging_dir
    from tasks.training.model import load_model
    from tests.harness import FAULT_ENV, fault
    from tests.test_launchers import dask_gpu_cluster

    def params_gap(a, b) -> float:
        m1, m2 = load_model(Path(a) / "model.pt")[0].state_dict(), load_model(Path(b) / "model.pt")[0].state_dict()
        return max(float((m1[k] - m2[k]).abs().max()) for k in m1)

    with tempfile.TemporaryDirectory(prefix="bench-faults-") as work:
        prepare(work)
        s = settings(work, **RUN)
        t0 = time.perf_counter()
        ref = train(s)
        ref_dir = Path(work) / "reference"
        os.replace(s.train.out_dir, ref_dir)
        print(f"uninterrupted: {time.perf_counter() - t0:.1f} s, {ref['steps']} steps, best val RMSE {ref['best_val_rmse']:.6f}")
        print(f"{'fault':<42}{'recovered in':>13}{'steps lost':>11}{'wall':>8}{'val RMSE':>11}{'max |Δparam|':>14}")

        def report(name: str, marker: Path, summary: dict, killed_at: int, wall: float) -> None:
            r = summary["resumed_from"]
            lost = killed_at - r["steps"]
            print(
                f"{name:<42}{r['at'] - marker.stat().st_mtime:>11.1f} s{lost:>11}{wall:>7.1f}s{summary['best_val_rmse']:>11.6f}"
                f"{params_gap(ref_dir, s.train.out_dir):>14.1e}",
                flush=True,
            )

        for name, spec, extra in (
            ("rank 1 SIGKILLed at step 70", "kill:1:70", {}),
            ("rank 0 hung at step 30 (timeout 5 s)", "hang:0:30", {"step_timeout_s": 5}),
        ):
            marker = Path(work) / f"fired-{spec.replace(':', '-')}"
            os.environ.update(fault(f"{spec}:{marker}"))
            t0 = time.perf_counter()
            summary = train(settings(work, **RUN, **extra))
            report(name, marker, summary, int(spec.split(":")[2]), time.perf_counter() - t0)

        marker = Path(work) / "fired-torchrun"
        os.environ.update(fault(f"kill:1:70:{marker}"))
        t0 = time.perf_counter()
        summary = train(settings(work, **RUN, launcher="torchrun"))
        report("torchrun: rank 1 SIGKILLed at step 70", marker, summary, 70, time.perf_counter() - t0)
        del os.environ[FAULT_ENV]

        # Dask: the worker running rank 1 SIGKILLs itself at step 70; a nanny replaces it, or (no nanny) elastic
        for name, nanny, extra in (
            ("dask: rank 1's worker lost, replaced", True, {}),
            ("dask: rank 1's worker lost, elastic 2->1", False, {"elastic": True, "rejoin_timeout_s": 2}),
        ):
            marker = Path(work) / f"fired-dask-{nanny}"
            with dask_gpu_cluster(Path(work), gpu=2, nanny=nanny, **fault(f"kill:1:70:{marker}")) as address:
                raw = settings(work, **RUN, **extra).model_dump(by_alias=True)
                raw["dask"]["address"], raw["train"]["launcher"] = address, "dask"
                t0 = time.perf_counter()
                summary = train(parse_settings(raw, root=work))
                report(name, marker, summary, 70, time.perf_counter() - t0)

        marker = Path(work) / "fired-corrupt"
        os.environ.update(fault(f"kill:0:90:{marker}"))
        t0 = time.perf_counter()
        try:
            train(settings(work, **RUN, max_restarts=0))
        except UserError:
            pass
        newest = listed(staging_dir(s.train.out_dir) / "checkpoints")[-1]
        newest.write_bytes(newest.read_bytes()[:1000])  # truncated
        del os.environ[FAULT_ENV]
        summary = train(settings(work, **RUN))
        report("rank 0 killed at 90, newest checkpoint cut", marker, summary, 90, time.perf_counter() - t0)

        one = settings(work, **{**RUN, "world_size": 1})
        ref1 = train(one)
        shutil.rmtree(ref_dir)
        os.replace(one.train.out_dir, ref_dir)
        (Path(work) / "params.yaml").write_text(yaml.safe_dump(one.model_dump(by_alias=True), sort_keys=False))
        marker = Path(work) / "fired-stage"
        env = {**os.environ, **fault(f"kill:0:110:{marker}")}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tasks.train"], cwd=work, env=env, capture_output=True)
        subprocess.run([sys.executable, "-m", "tasks.train"], cwd=work, env=env, capture_output=True, check=True)
        summary = json.loads((Path(one.train.out_dir) / "summary.json").read_text())
        report("stage process SIGKILLed at step 110 (1 rank)", marker, summary, 110, time.perf_counter() - t0)
        print(f"(1-rank uninterrupted: best val RMSE {ref1['best_val_rmse']:.6f})")


if __name__ == "__main__":
    main()
