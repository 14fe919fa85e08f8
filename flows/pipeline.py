"""The `training-pipeline` Prefect flow: the same stage functions as `dvc repro`, in order.

Run: python -m flows.pipeline   (Prefect's temporary local server, or the server in PREFECT_API_URL)
"""

from __future__ import annotations

import os
import sys
import time

# telemetry off wherever this runs from (pyproject.toml's [tool.prefect] only applies in the project root)
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from tasks.evaluate import evaluate  # noqa: E402
from tasks.ingest import ingest  # noqa: E402
from tasks.package import package  # noqa: E402
from tasks.preprocess import preprocess  # noqa: E402
from tasks.settings import PARAMS, UserError, load_settings  # noqa: E402
from tasks.train import train  # noqa: E402
from tasks.validate import validate  # noqa: E402

STAGES = [ingest, validate, preprocess, train, evaluate, package]


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(params_path: str = PARAMS) -> dict:
    """Validate, preprocess, train, evaluate and package a model from params.yaml; return the test metrics."""
    log = get_run_logger()
    s = load_settings(params_path)
    results, timings = {}, {}
    for stage in STAGES:
        t0 = time.perf_counter()
        results[stage.__name__] = task(stage, name=stage.__name__, cache_policy=NO_CACHE)(s)
        timings[stage.__name__] = round(time.perf_counter() - t0, 2)
        log.info("%s done in %.1f s", stage.__name__, timings[stage.__name__])
    return {"metrics": results["evaluate"], "package": results["package"]["out_dir"], "seconds": timings}


def main() -> None:
    t0 = time.perf_counter()
    try:
        load_settings()  # bad params stop here, before a Prefect server is started
        out = training_pipeline()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    m = out["metrics"]
    print("\nstage seconds: " + ", ".join(f"{k} {v}" for k, v in out["seconds"].items()))
    print(f"test metrics:  RMSE {m['rmse']:.4f}  MAE {m['mae']:.4f}  R² {m['r2']:.4f}  (n={m['n']:,})")
    print(f"package:       {out['package']}/")
    print(f"wall time:     {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
