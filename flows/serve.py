"""Serve Trainflow's deployments from this machine: `training-pipeline` on the schedule in prefect.yaml, and
`batch-predict` and `hyperparameter-search` on demand.  Run in the project root: trainflow serve (or python -m flows.serve), with
PREFECT_API_URL set (e.g. http://127.0.0.1:4200/api; `trainflow ui` starts a server).

Runs are executed here. Each deployment's concurrency limit is 1 (prefect.yaml's), so a second run of it
waits in the queue instead of racing for the workspace. Stopping this process pauses the deployments (no
run is queued for nobody); starting it again resumes them with the same schedule, which lives in the
server's database.

Warm runs: Prefect runs each flow run in a fresh interpreter, which imports Prefect, torch, Dask and Great
Expectations again (seconds per run). Here a run's process is forked from a server process that imported them
once (multiprocessing's forkserver, preloaded with every stage module), so a triggered run pays for its
stages' work and DVC's bookkeeping, not for imports. Before each run the project's code (tasks/, flows/) is
compared with what that server imported; when it changed, the server is restarted and imports it afresh:
a run never executes stale code. params.yaml and the data are read by each run itself.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

from flows.pipeline import PRELOAD as PIPELINE_PRELOAD  # (light: flows.pipeline imports Prefect where it is used)
from flows.pipeline import WARM

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


def deployment_spec(name: str) -> dict:
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    return next(d for d in spec["deployments"] if d["name"] == name)


def serve_here(runner) -> None:
    """Add the flows to `runner` as deployments, with prefect.yaml's description, concurrency limit and
    schedules. As flows (Runner.add_flow), not deployments loaded from storage: the runner then runs each flow
    run from the flow object in a process of its own (see warm_runs), not via `python -m prefect.engine`."""
    from prefect.schedules import Cron

    from flows.pipeline import build
    from flows.predict import batch_predict
    from flows.search import hyperparameter_search

    for flow in (build(Path("params.yaml").resolve()), batch_predict, hyperparameter_search):
        spec = deployment_spec(flow.name)
        runner.add_flow(
            flow,
            name=spec["name"],
            description=spec["description"],
            concurrency_limit=spec.get("concurrency_limit"),
            schedules=[Cron(s["cron"], timezone=s.get("timezone", "UTC")) for s in spec.get("schedules") or []],
        )


STAGE_MODULES = ("ingest", "validate", "preprocess", "train", "evaluate", "package", "promote", "predict")
# the flow and stage modules and what they import when they run (Prefect, torch, Dask, GX; ONNX export's
# torch.export and onnxscript, seconds of the package stage otherwise)
PRELOAD = [
    "prefect",
    "flows.stages",
    "flows.pipeline",
    "flows.predict",
    "flows.search",
    "tasks.search",
    *(f"tasks.{m}" for m in STAGE_MODULES),
    *PIPELINE_PRELOAD,
    "torch.export",
    "torch.onnx._internal.exporter._core",
    "onnxscript",
    "onnxruntime",
    "flows.warm",  # (last: builds once what every run would build again)
]
CODE = ("tasks", "flows")


def code_fingerprint() -> tuple:
    """What the forkserver imported: every module file of the project's code, by name, size and mtime."""
    root = PREFECT_YAML.parent
    return tuple(
        sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for d in CODE for p in (root / d).rglob("*.py"))
    )


class WarmContext:
    """multiprocessing's "spawn" context as Prefect asks for it, answered with a forkserver preloaded with the
    stage modules; restarted when the code changed since it started."""

    def __init__(self):
        import multiprocessing

        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.started_with: tuple | None = None
        self.restarts = 0

    def get_context(self, method=None):
        import multiprocessing
        import multiprocessing.forkserver as forkserver

        if method not in (None, "spawn"):
            return multiprocessing.get_context(method)
        now = code_fingerprint()
        if self.started_with is not None and now != self.started_with:
            print("trainflow serve: the project's code changed; restarting the warm process server", flush=True)
            forkserver._forkserver._stop()  # the next run starts a fresh one, importing the new code
            self.restarts += 1
        if now != self.started_with:  # a warm process starts now: the runs it forks inherit when (their report says it)
            os.environ[WARM] = json.dumps({"since": time.strftime("%Y-%m-%d %H:%M:%S"), "restarts": self.restarts})
        self.started_with = now
        return self.ctx

    def __getattr__(self, name):  # the rest of the multiprocessing module
        import multiprocessing

        return getattr(multiprocessing, name)


def warm_runs() -> WarmContext:
    """Prefect's flow runs, from now on, from the warm forkserver."""
    import multiprocessing.forkserver

    import prefect.flow_engine

    warm = WarmContext()
    prefect.flow_engine.multiprocessing = warm  # type: ignore[assignment]  # (its only use: get_context("spawn"))
    warm.get_context()  # (notes the code it imports, and since when)
    multiprocessing.forkserver.ensure_running()  # started now, not by the first run: it imports while serve starts up
    return warm


def main(argv: list[str] | None = None) -> None:
    """`trainflow serve`: serve the training-pipeline (scheduled) and batch-predict deployments here."""
    argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0]).parse_args(argv)
    import asyncio

    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner
    from prefect.settings import get_current_settings

    from flows.server import telemetry_off

    telemetry_off()
    warm_runs()
    # a run triggered from the UI starts within 0.5 s (Prefect's default: up to 10 s); a query is one small request
    runner = Runner(pause_on_shutdown=True, query_seconds=float(os.environ.get("PREFECT_RUNNER_POLL_FREQUENCY", 0.5)))
    serve_here(runner)
    ui = (get_current_settings().ui_url or "the Prefect UI").rstrip("/")
    print(f"Serving training-pipeline and batch-predict here; trigger them from {ui}/deployments", flush=True)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):  # Ctrl-C, SIGTERM: the runner paused the deployments
        pass


if __name__ == "__main__":
    main()
