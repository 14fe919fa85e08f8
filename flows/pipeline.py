"""The `training-pipeline` Prefect flow: the stage functions of `dvc repro`, in order, with DVC as the cache.

Run: python -m flows.pipeline   (Prefect's temporary local server, or the server in PREFECT_API_URL)

The flow's parameters are the sections of params.yaml as typed models (descriptions and bounds from
tasks/settings.py; defaults from params.yaml), so the Prefect UI shows them as a form and refuses bad
values before any stage runs. A run with parameters equal to params.yaml works in the project workspace;
one whose parameters differ runs as a DVC experiment and leaves params.yaml and the workspace as they were.
(No `from __future__ import annotations` here: Prefect builds the parameter schema from real annotations.)
"""

import importlib
import json
import os
import sys
import time
import uuid
import warnings
from pathlib import Path

# telemetry off wherever this runs from (pyproject.toml's [tool.prefect] only applies in the project root)
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the parameter named like params.yaml's `validate` section shadows pydantic's deprecated BaseModel.validate
warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)

from prefect import flow, get_run_logger, runtime, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.states import Completed  # noqa: E402

from flows.workspace import Workspace, changed_params, experiment_name  # noqa: E402
from tasks.settings import (  # noqa: E402
    PARAMS, DaskSettings, DatasetSettings, DvcSettings, EvaluateSettings, IngestSettings, PackageSettings, PreprocessSettings,
    Settings, TrainSettings, UserError, ValidateSettings, load_settings, parse_settings,
)

STAGES = ["ingest", "validate", "preprocess", "train", "evaluate", "package", "promote"]
try:
    DEFAULTS = load_settings(Path(__file__).resolve().parents[1] / PARAMS)  # the UI form's defaults
except UserError as e:  # no flow can be defined without them
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


STAGE_RETRIES = 2


def infrastructure_failure(_task, _task_run, state) -> bool:
    """Prefect retries a stage only after an infrastructure failure (a lost Dask worker or connection, a
    timeout, training ranks that kept dying after their own restarts); never after bad data or params
    (UserError) or a bug in our code (any other traceback): those would fail the same way again."""
    from distributed import KilledWorker

    try:
        error = state.result(raise_on_failure=False)
    except Exception as e:  # noqa: BLE001 - the result of a crashed task is the error itself
        error = e
    if isinstance(error, UserError):
        return str(error).startswith("train: gave up after")  # the training group's own restarts ran out
    return isinstance(error, (KilledWorker, ConnectionError, TimeoutError))


def run_stage(name: str, settings: Settings, ws: Workspace):
    """Run one stage unless DVC finds it up to date; then record it in dvc.lock and the DVC cache."""
    t0 = time.perf_counter()
    changes = ws.changes(name)
    if not changes:
        return Completed(name="Cached", message="up to date in DVC",
                         data={"status": "cached", "seconds": round(time.perf_counter() - t0, 3)})
    get_run_logger().info("%s: %s", name, json.dumps(changes))
    stage = getattr(importlib.import_module(f"tasks.{name}"), name)  # imported only when it runs
    result = stage(settings)  # the cwd is the workspace root (or the experiment's worktree)
    ws.commit(name)
    return {"status": "ran", "seconds": round(time.perf_counter() - t0, 3), "result": result}


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(
    dataset: DatasetSettings = DEFAULTS.dataset,
    ingest: IngestSettings = DEFAULTS.ingest,
    validate: ValidateSettings = DEFAULTS.validate_,
    preprocess: PreprocessSettings = DEFAULTS.preprocess,
    dask: DaskSettings = DEFAULTS.dask,
    train: TrainSettings = DEFAULTS.train,
    evaluate: EvaluateSettings = DEFAULTS.evaluate,
    package: PackageSettings = DEFAULTS.package,
    dvc: DvcSettings = DEFAULTS.dvc,
) -> dict:
    """Validate, preprocess, train, evaluate and package a model; stages DVC finds up to date are skipped."""
    t0 = time.perf_counter()
    ws = Workspace(Path.cwd())
    if ws.root != Path.cwd().resolve():
        raise UserError(f"run the flow from the project root {ws.root}, not {Path.cwd()} (settings paths are relative to it)")
    raw = {"dataset": dataset, "ingest": ingest, "validate": validate, "preprocess": preprocess, "dask": dask,
           "train": train, "evaluate": evaluate, "package": package, "dvc": dvc}
    settings = parse_settings({k: v.model_dump() for k, v in raw.items()}, "the run's parameters", root=ws.root)
    changed = changed_params(settings, load_settings(PARAMS))
    previous = _read_json(settings.evaluate.out_dir, "metrics.json")
    with ws.locked():
        if changed:
            run_id = runtime.flow_run.id or uuid.uuid4()
            name = experiment_name(runtime.flow_run.name, run_id)
            get_run_logger().info("parameters differ from params.yaml (%s): running as DVC experiment %s",
                                  ", ".join(changed), name)
            with ws.experiment(name, run_id, settings) as exp:
                exp.check_graph()
                stages, metrics, data_version, training, gate = _run_stages(settings, exp)
        else:
            name = None
            ws.check_graph()
            stages, metrics, data_version, training, gate = _run_stages(settings, ws)
        if settings.dvc.push:
            ws.push()
    summary = {
        "gate": gate, "metrics": metrics, "previous_metrics": previous, "experiment": name, "changed_params": changed,
        "data_version": data_version, "stages": stages, "seconds": round(time.perf_counter() - t0, 2),
        "package": settings.package.out_dir, "training": _training_summary(training),
    }
    _publish_training(training)
    _publish(summary)
    if gate and gate["decision"] != "promote":  # a finished run that leaves the champion in place says so
        return Completed(name="Not promoted", message=gate["message"], data=summary)
    return summary


def _run_stages(settings: Settings, ws: Workspace) -> tuple:
    """Each stage as a Prefect task named after it; returns their status, the test metrics, the data version,
    the train stage's summary and the gate's decision."""
    stages = {}
    for name in STAGES:
        state = task(run_stage, name=name, cache_policy=NO_CACHE, retries=STAGE_RETRIES, retry_delay_seconds=5,
                     retry_condition_fn=infrastructure_failure)(name, settings, ws, return_state=True)
        if name == "validate" and Path(settings.validate_.report_md).exists():  # passed or not
            create_markdown_artifact(key="validation-report", markdown=Path(settings.validate_.report_md).read_text(),
                                     description="Every expectation of the suite on this run's data")
        stages[name] = state.result()  # raises the stage's error: later stages do not run
        stages[name].pop("result", None)
    data_version = ws.lock_entry("ingest").get("outs", [{}])[0].get("md5")
    return (stages, _read_json(settings.evaluate.out_dir, "metrics.json"), data_version,
            _read_json(settings.train.out_dir, "summary.json"), _read_json(settings.evaluate.out_dir, "gate.json"))


def _training_summary(training: dict | None) -> dict | None:
    """The train stage's figures for the flow's result (its per-epoch history goes to an artifact)."""
    if training is None:
        return None
    keep = ("best_epoch", "epochs_run", "best_val_rmse", "world_size", "launcher", "strategy", "precision", "device",
            "seconds", "samples_per_s", "time_split_s", "gpu_peak_memory_gib", "restarts", "resumed_from")
    return {k: training[k] for k in keep if k in training}


def _publish_training(training: dict | None) -> None:
    """Per epoch, over all ranks: losses, samples/s and where the step time went (a table in the Prefect UI)."""
    if not training or not training.get("epochs"):
        return
    rows = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in e.items()} for e in training["epochs"]]
    split = training.get("time_split_s", {})
    create_table_artifact(
        key="training-epochs", table=rows,
        description=(f"{training.get('world_size')} rank(s), {training.get('launcher')}, {training.get('strategy')}, "
                     f"{training.get('precision')}: step time {split.get('data', 0):.2f} s data, "
                     f"{split.get('compute', 0):.2f} s compute, {split.get('sync', 0):.2f} s gradient sync"))


def _read_json(directory: str, name: str) -> dict | None:
    path = Path(directory) / name
    return json.loads(path.read_text()) if path.exists() else None


def _publish(summary: dict) -> None:
    """A markdown summary and a metrics table for the flow run page in the Prefect UI."""
    m, prev = summary["metrics"] or {}, summary["previous_metrics"] or {}
    rows = [{"metric": k, "value": round(v, 6), "previous": None if prev.get(k) is None else round(prev[k], 6),
             "change": None if prev.get(k) is None else round(v - prev[k], 6)}
            for k, v in m.items() if isinstance(v, float)]
    create_table_artifact(key="metrics", table=rows, description="Test metrics of this run vs the workspace's previous ones")
    stages = "\n".join(f"| {k} | {v['status']} | {v['seconds']:.2f} |" for k, v in summary["stages"].items())
    changed = "\n".join(f"- `{k}`: {a!r} → {b!r}" for k, (a, b) in summary["changed_params"].items()) or "- none (params.yaml)"
    where = (f"DVC experiment `{summary['experiment']}` (`dvc exp show`; `dvc exp apply {summary['experiment']}` to use it)"
             if summary["experiment"] else "the workspace (dvc.lock updated)")
    metrics = " · ".join(f"{r['metric'].upper()} {r['value']:.4f}" + (f" ({r['change']:+.4f})" if r["change"] is not None else "")
                         for r in rows)
    create_markdown_artifact(key="training-summary", description="Trainflow run summary", markdown=f"""# Trainflow run

**Test metrics:** {metrics or 'n/a'}

**Data version (DVC md5 of the raw data):** `{summary['data_version']}` · **Results in:** {where}

**Gate:** {(summary['gate'] or {}).get('message', 'n/a')}

**Training:** {_training_line(summary['training'])}

## Parameters changed from params.yaml
{changed}

## Stages ({summary['seconds']:.1f} s in all)
| stage | status | seconds |
|---|---|---|
{stages}
""")


def _training_line(training: dict | None) -> str:
    if not training:
        return "n/a"
    split = training.get("time_split_s", {})
    return (f"{training['world_size']} rank(s) ({training.get('launcher')}, {training.get('strategy')}, {training.get('precision')} "
            f"on {training.get('device')}), {training['epochs_run']} epochs (best {training['best_epoch']}), "
            f"{training['samples_per_s']:,.0f} samples/s; step time {split.get('data', 0):.2f} s data · "
            f"{split.get('compute', 0):.2f} s compute · {split.get('sync', 0):.2f} s gradient sync (per epoch: "
            "the `training-epochs` artifact)" + _recovery(training))


def _recovery(training: dict) -> str:
    """The failures training recovered from, and where it resumed, for the run page."""
    parts = [f"restart {r['attempt']} after a {r['kind']} failure: {r['cause']}" for r in training.get("restarts") or []]
    resumed = training.get("resumed_from")
    if resumed:
        parts.append(f"resumed from `{resumed['checkpoint']}` (epoch {resumed['epoch']}, {resumed['steps']} steps done)")
    return "".join(f"\n- {p}" for p in parts)


def check_api() -> None:
    """A configured Prefect API must answer; otherwise say how to fix it instead of a connection traceback.
    With none configured, start the temporary local server (start_temporary_server)."""
    import urllib.request

    from prefect.settings import PREFECT_SERVER_EPHEMERAL_ENABLED, get_current_settings

    url = get_current_settings().api.url
    if not url:
        if PREFECT_SERVER_EPHEMERAL_ENABLED.value():  # else Prefect itself says to set PREFECT_API_URL
            start_temporary_server()
        return
    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10).close()
    except OSError as e:
        raise UserError(f"PREFECT_API_URL={url} does not answer ({getattr(e, 'reason', e)}); start the server "
                        "(prefect server start --host 127.0.0.1) or unset PREFECT_API_URL to use a temporary local one") from None


REAPER = """
import os, signal, sys, time
pipe, pid = int(sys.argv[1]), int(sys.argv[2])
os.read(pipe, 1)  # returns when the flow process is gone, however it ended: it held the only write end
def ours():
    try:
        return b"prefect.server.api.server" in open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return False
if ours():
    os.kill(pid, signal.SIGTERM)
    for _ in range(50):
        time.sleep(0.1)
        if not ours():
            break
    else:
        os.kill(pid, signal.SIGKILL)
"""


def start_temporary_server() -> None:
    """Start the temporary local Prefect server that Prefect would start on first use (the same one: Prefect
    keeps it as a singleton and stops it at exit), plus a small process that stops it should this process be
    killed (SIGKILL, OOM) and never reach its exit handlers: no orphaned server is left holding its port."""
    import subprocess

    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    if server.server_process is None or not Path("/proc").is_dir():
        return
    read, write = os.pipe()  # neither end is inherited by the server or the ranks (O_CLOEXEC)
    subprocess.Popen([sys.executable, "-c", REAPER, str(read), str(server.server_process.pid)], pass_fds=(read,),
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    os.close(read)
    _held.append(write)  # open until this process ends


_held: list[int] = []


def main() -> None:
    t0 = time.perf_counter()
    try:
        load_settings()  # bad params stop here, before a Prefect server is started
        check_api()
        out = training_pipeline()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    m = out["metrics"]
    print("\nstages: " + ", ".join(f"{k} {v['status']} {v['seconds']:.1f}s" for k, v in out["stages"].items()))
    print(f"test metrics:  RMSE {m['rmse']:.4f}  MAE {m['mae']:.4f}  R² {m['r2']:.4f}  (n={m['n']:,})")
    print(f"package:       {out['package']}/")
    print(f"gate:          {(out.get('gate') or {}).get('message', 'n/a')}")
    print(f"wall time:     {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
