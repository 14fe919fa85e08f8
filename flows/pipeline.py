"""The `training-pipeline` Prefect flow: the stage functions of `dvc repro`, in order, with DVC as the cache.

Run: trainflow run, or python -m flows.pipeline (Prefect's temporary local server, or the one in
PREFECT_API_URL). The flow's parameters are the Prefect UI's form (flows/params.py); a run whose settings
differ from params.yaml runs as a DVC experiment and leaves params.yaml and the workspace as they were.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import inspect
import json
import logging
import os
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from flows import report
from flows.params import forms, settings_for
from flows.server import prefect_api, start_early, telemetry_off
from flows.workspace import Workspace, changed_params, experiment_name
from tasks import timeline
from tasks.errors import TrainflowError, UserError
from tasks.metrics import NAMES, shown
from tasks.settings import PARAMS, Settings, load_settings

if TYPE_CHECKING:  # Prefect is imported where it is used: `trainflow run` starts the server first (flows/server.py)
    from prefect.client.schemas.objects import State


class Stage:
    """A stage function, imported when it first runs: a run whose stages DVC finds up to date never imports
    torch, Dask or Great Expectations (seconds of a no-op run's start)."""

    def __init__(self, name: str):
        self.__name__ = name

    def __call__(self, *args, **kwargs):
        import importlib

        with timeline.phase("imports"):  # the stage's start-up, not its work
            run = getattr(importlib.import_module(f"tasks.{self.__name__}"), self.__name__)
        return run(*args, **kwargs)


ingest, validate, preprocess, train, evaluate, package, promote = (
    Stage(n) for n in ("ingest", "validate", "preprocess", "train", "evaluate", "package", "promote")
)


def run_stages(s: Settings, ws: Workspace) -> dict:
    """The pipeline, stage by stage; their status and seconds."""
    from flows.stages import Stages

    progress = report.TrainingProgress()
    run = Stages(s, ws)
    run(ingest)
    run(validate, then=lambda: report.publish_validation(s.validate_.report_md))
    run(preprocess)
    run(train, then=progress.finish, on_epoch=progress)
    run(evaluate)
    run(package)
    run(promote)
    return run.done


def pipeline(parameters: dict) -> dict | State:
    """Validate, preprocess, train, evaluate and package a model; stages DVC finds up to date are skipped."""
    from prefect import get_run_logger, runtime
    from prefect.states import Completed

    t0, start = time.perf_counter(), timeline.flow_started()
    process = process_state()
    ws = Workspace(Path.cwd())
    if ws.root != Path.cwd().resolve():
        raise UserError(f"run the flow from the project root {ws.root}, not {Path.cwd()} (settings paths are relative to it)")
    settings, _ = settings_for(parameters, ws.root)
    changed = changed_params(settings, load_settings(ws.root / PARAMS))
    previous = report.read_json(Path(settings.evaluate.out_dir) / "metrics.json")
    name = None
    with ws.locked():
        if changed:
            run_id = str(runtime.flow_run.id or uuid.uuid4())
            name = experiment_name(runtime.flow_run.name, run_id)
            get_run_logger().info(
                "parameters differ from params.yaml (%s): running as DVC experiment %s", ", ".join(changed), name
            )
            with ws.experiment(name, run_id, settings, changed) as exp:
                exp.check_graph()
                stages = run_stages(settings, exp)
                outputs = collect(settings, exp)  # read in the experiment's worktree, before it is removed
                iteration = loop_report(settings, exp, stages, start, process)  # saved with the experiment
        else:
            ws.check_graph()
            stages = run_stages(settings, ws)
            outputs = collect(settings, ws)
            iteration = loop_report(settings, ws, stages, start, process)
        if settings.dvc.push:
            ws.push()
    outputs.update(
        stages=stages,
        previous_metrics=previous,
        experiment=name,
        changed_params=changed,
        seconds=round(time.perf_counter() - t0, 2),
        package=settings.package.out_dir,
    )
    if iteration:
        report.publish_iteration(iteration)
    outputs["iteration"] = {k: v for k, v in iteration.items() if k not in ("chart", "timeline")}
    if stages["train"]["status"] == "ran":
        report.publish_training(outputs["training"])
    report.publish_summary(outputs)
    gate = outputs["gate"] or {}
    outputs.pop("package_manifest")
    if stages["evaluate"]["status"] == "ran" and gate.get("decision") == "keep":
        return Completed(name="Not promoted", message=gate["message"], data=outputs)  # finished, champion kept
    return outputs


def loop_report(s: Settings, ws: Workspace, stages: dict, start: float, process: dict) -> dict:
    """reports/iteration.json and .png of this run (in the workspace, or the experiment's worktree)."""
    from prefect import get_run_logger

    ran = {k for k, v in stages.items() if v["status"] == "ran"}
    try:
        parts = {name: part for name, part in timeline.read_parts(ws.root).items() if name in ran}
        iteration = timeline.combine(ws.root, s, "flow", start, time.time(), parts) | {"process": process}
        timeline.write(ws.root, iteration)
    except Exception as e:  # the run's work is done; a report that could not be written must not fail it
        get_run_logger().warning("the iteration report was not written (%s: %s)", type(e).__name__, e)
        return {}
    return iteration | {"chart": report.image(ws.root / timeline.CHART, "timeline of the loop")}


WARM = "TRAINFLOW_WARM_PROCESS"  # set by `trainflow serve` in its warm process (JSON: since when), so in the runs it forks
HEAVY = ("prefect", "pandas", "great_expectations", "distributed", "torch", "onnxscript")  # seconds each to import


def process_state() -> dict:
    """The run's process as the flow starts: forked from `trainflow serve`'s warm process (since when), or not;
    which of the heavy modules it had imported already (a fresh `trainflow run` imports them while its server
    starts)."""
    state = {"warm": WARM in os.environ, "imported": [m for m in HEAVY if m in sys.modules]}
    with contextlib.suppress(ValueError):
        state |= json.loads(os.environ.get(WARM, "{}"))
    return state


def collect(s: Settings, ws: Workspace) -> dict:
    """The run's outputs for its summary: test metrics, gate, training summary, the package's manifest."""
    return {
        "metrics": report.read_json(Path(s.evaluate.out_dir) / "metrics.json"),
        "gate": report.read_json(Path(s.evaluate.out_dir) / "gate.json"),
        "training": report.read_json(Path(s.train.out_dir) / "summary.json"),
        "learning_curve": report.image(Path(s.evaluate.out_dir) / "figures" / "learning_curve.png", "learning curves"),
        "package_manifest": report.read_json(Path(s.package.out_dir) / "manifest.json"),
        "data_version": ws.lock_entry("ingest").get("outs", [{}])[0].get("md5"),
    }


@functools.cache
def build(params: Path = Path(PARAMS)):
    """The flow, its parameters the form models of params.yaml (built on first use, not at import)."""
    from prefect import flow
    from prefect.states import Failed

    # a parameter named like params.yaml's `validate` section shadows pydantic's deprecated BaseModel.validate
    warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)
    models = forms(params)

    def training_pipeline(**parameters) -> dict | State:
        try:
            return pipeline(parameters)
        except UserError as e:  # bad data or params: the run fails with the message alone, as the stage CLIs do
            return Failed(message=str(e), data=e)

    training_pipeline.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=model(), annotation=model)
            for name, model in models.items()
        ],
        return_annotation=dict,
    )
    training_pipeline.__doc__ = pipeline.__doc__
    training_pipeline.__qualname__ = "training_pipeline"  # the deployment's entrypoint: flows/pipeline.py:training_pipeline
    return flow(name="training-pipeline", log_prints=True, validate_parameters=True)(training_pipeline)


def __getattr__(name: str):
    if name == "training_pipeline":  # `from flows.pipeline import training_pipeline`, and Prefect's entrypoint
        return build(Path(PARAMS).resolve())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _NotFailedState(logging.Filter):
    """Prefect's console line "Finished in state Failed('<message>')": the command prints the message itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Finished in state Failed(")


@contextlib.contextmanager
def quiet_failures():
    """On the console only (the Prefect UI keeps every log line): a run's failure is said once, by the command."""
    handlers = [h for name in ("", "prefect") for h in logging.getLogger(name).handlers if isinstance(h, logging.StreamHandler)]
    quiet = _NotFailedState()
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(quiet)


# the modules each stage imports, in the pipeline's order: imported while a Prefect server starts (seconds a cold
# run waits anyway), so that the stages' own start-up is not paid after it
STAGE_IMPORTS = {
    "ingest": ("pandas", "pyarrow.parquet", "tasks.ingest"),
    "validate": ("tasks.validate", "great_expectations"),
    "preprocess": ("distributed", "dask.dataframe", "tasks.preprocess"),
    "train": ("torch", "tasks.training.launch"),
    "evaluate": ("tasks.evaluate", "tasks.figures", "pyarrow.dataset"),
    "package": ("tasks.package",),
    "promote": (),
}
REPORT_IMPORTS = ("pandas", "matplotlib.pyplot")  # the run's summary tables and its timeline chart, even when nothing ran


def imports_of(stages) -> list[str]:
    """The modules these stages and the run's report import, each once, in the pipeline's order."""
    return list(dict.fromkeys([m for stage in stages for m in STAGE_IMPORTS[stage]] + list(REPORT_IMPORTS)))


PRELOAD = tuple(imports_of(STAGE_IMPORTS))


def preload(ready) -> None:
    """While the server starts: build the flow, ask DVC which stages are out of date, then import what the first of
    them and every later one import, then what the run's report needs (one module at a time, until the server answers). A run
    with nothing to do imports no stage's modules, and the server starts with both cores."""
    import importlib

    with timeline.phase("imports", stage="runner"):  # (phases of their own in the report: not the server's start)
        build(Path(PARAMS).resolve())  # the flow itself first: Prefect's flow machinery and the form's models
    with timeline.phase("dvc status", stage="runner"):
        todo = stages_to_run()
    with timeline.phase("imports", stage="runner"):
        for name in imports_of(todo):
            if ready():
                break
            importlib.import_module(name)
    gc.freeze()  # the modules stay for the run: the collector's full passes need not walk them


def stages_to_run() -> list[str]:
    """The first stage DVC finds out of date and those after it (a stage's changed inputs show only once the stage
    before it ran); all of them when DVC cannot say now (the flow then says why, or waits for a busy workspace)."""
    try:
        ws = Workspace(Path.cwd())
        try:
            first = next((i for i, stage in enumerate(STAGE_IMPORTS) if ws.changes(stage)), len(STAGE_IMPORTS))
        finally:
            ws.repo.close()
    except Exception:
        return list(STAGE_IMPORTS)
    return list(STAGE_IMPORTS)[first:]


def main(argv: list[str] | None = None) -> None:
    """`trainflow run`: the whole pipeline on params.yaml, as a Prefect flow run; a short report at the end."""
    argparse.ArgumentParser(prog="python -m flows.pipeline", description=main.__doc__).parse_args(argv)
    telemetry_off()
    t0 = time.perf_counter()
    timeline.process_started()  # this process's imports, then the server's start, are the loop's first phases
    try:
        load_settings()  # bad params stop here, before a Prefect server is started
        start_early()
        with prefect_api(while_waiting=preload):
            training_pipeline = build(Path(PARAMS).resolve())  # (imports Prefect, which sets up its log handlers)
            with quiet_failures():
                out = training_pipeline(return_state=True).result()
    except TrainflowError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    finally:
        gc.freeze()  # the interpreter's exit then skips a collection over every module (seconds after torch, GX)
    m = out["metrics"]
    print("\nstages: " + ", ".join(f"{k} {v['status']} {v['seconds']:.1f}s" for k, v in out["stages"].items()))
    print("test metrics:  " + "  ".join(f"{NAMES[k]} {m[k]:.4f}" for k in shown(m)) + f"  (n={m['n']:,})")
    print(f"package:       {out['package']}/")
    print(f"gate:          {(out.get('gate') or {}).get('message', 'n/a')}")
    it = out["iteration"]
    if it:
        print(
            f"loop:          {it['wall_s']:.1f} s, stage work {it['work_s']:.1f} s ({100 * (it['useful_fraction'] or 0):.0f}%); "
            + ", ".join(f"{k} {v:.1f} s" for k, v in it["overhead"].items())
            + " (reports/iteration.json, reports/iteration.png)"
        )
    print(f"wall time:     {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
