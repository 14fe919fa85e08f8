"""The `hyperparameter-search` Prefect flow: the features (the pipeline's stages up to preprocess, skipped when
DVC finds them up to date), the Optuna study of tasks/search.py on Dask, each complete trial saved as a DVC
experiment (`dvc exp show`), and the study's report (search.out_dir: search.md, history.png, importances.png;
the same as Prefect artifacts).

Run: trainflow search, or python -m flows.search. `trainflow search --apply` writes the best trial's values into
params.yaml (comments kept); the next `trainflow run` trains it and the gate judges it like any run.
A killed search resumes from its storage when run again (tasks/search.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import uuid
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from flows import report
from flows.pipeline import Stage, quiet_failures
from flows.server import prefect_api, telemetry_off
from flows.stages import Stages
from flows.workspace import Workspace, changed_params
from tasks.errors import TrainflowError, UserError
from tasks.files import atomic_path
from tasks.search import best_values, figures, open_study, search, trials_root, with_values
from tasks.settings import PARAMS, Settings, edit_params, load_settings

EXPERIMENT = "dvc-experiment"  # in a trial's directory once its DVC experiment is saved: the experiment's name


def save_experiments(s: Settings, ws: Workspace) -> list[str]:
    """A DVC experiment per complete trial not saved yet (also those of a killed search): params.yaml with its
    values, and its training's metrics and plots (train.log_dir); named STUDY-trial-N."""
    from optuna.trial import TrialState

    study = open_study(s.search, heartbeat=False)
    saved = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        where = trials_root(s.search).resolve() / f"trial-{trial.number:04d}"
        if (where / EXPERIMENT).exists():
            continue
        name = f"{s.search.study}-trial-{trial.number}"
        settings = with_values(s, trial.params, f"search trial {trial.number}")
        run_id = uuid.uuid5(uuid.NAMESPACE_URL, f"trainflow-search/{s.search.study}/{trial.number}")
        # its dvc.lock stays the workspace's (the trial's model is not kept: apply its values and run to get it)
        with ws.experiment(name, str(run_id), settings, changed_params(settings, s)) as exp:
            shutil.copytree(where / "live", exp.root / s.train.log_dir, dirs_exist_ok=True)
        (where / EXPERIMENT).write_text(name + "\n")
        saved.append(name)
    return saved


def markdown(summary: dict, saved: list[str]) -> str:
    best = summary["best"]
    head = (
        f"# Search `{summary['study']}`: best trial {best['number']}, {summary['metric']} {best['value']:.4f}\n\n"
        + "\n".join(f"- `{k}`: {v!r}" for k, v in best["params"].items())
        + "\n\nApply it: `trainflow search --apply`, then `trainflow run` (the gate compares it with the champion)."
        if best
        else f"# Search `{summary['study']}`: no complete trial\n"
    )
    rows = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in t.items()} for t in summary["trials"]]
    states = ", ".join(f"{n} {k.lower()}" for k, n in summary["states"].items())
    return (
        f"{head}\n\n**Trials:** {states} ({summary['seconds']:.0f} s this run; DVC experiments saved: {len(saved)})\n\n"
        f"{report.table(rows)}\n"
    )


def write_report(s: Settings, summary: dict, saved: list[str]) -> str:
    """search.md and the figures in search.out_dir; the markdown with the figures inline (the artifact)."""
    out = Path(s.search.out_dir)
    summary["importances"] = figures(open_study(s.search, heartbeat=False), out, s.search.metric)
    text = markdown(summary, saved)
    with atomic_path(out / "search.md") as tmp:
        Path(tmp).write_text(text)
    return (
        text
        + "\n"
        + report.image(out / "history.png", "optimisation history")
        + "\n"
        + report.image(out / "importances.png", "parameter importances")
    )


def run_search(s: Settings) -> dict:
    """Features, the study, its DVC experiments and its report."""
    ws = Workspace(Path.cwd())
    if ws.root != Path.cwd().resolve():
        raise UserError(f"run the search from the project root {ws.root}, not {Path.cwd()}")
    with ws.locked():
        ws.check_graph()
        run = Stages(s, ws)
        for name in ("ingest", "validate", "preprocess"):
            run(Stage(name))
        # (Prefect's overloads do not cover these functions' optional parameters)
        summary = task(search, name="study", cache_policy=NO_CACHE)(s)  # type: ignore[call-overload]
        saved = task(save_experiments, name="dvc-experiments", cache_policy=NO_CACHE)(s, ws)  # type: ignore[call-overload]
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_markdown_artifact(key="search", markdown=write_report(s, summary, saved), description="Hyperparameter search")
    create_table_artifact(key="search-trials", table=summary["trials"], description="Every trial of the study")
    return summary | {"experiments": saved}


@flow(name="hyperparameter-search", log_prints=True)
def hyperparameter_search():
    """An Optuna study over params.yaml's search.space, its trials on Dask, each complete one a DVC experiment."""
    try:
        return run_search(load_settings())
    except UserError as e:  # bad params: the run fails with the message alone
        return Failed(message=str(e), data=e)


def apply(params: Path = Path(PARAMS)) -> dict:
    """Write the best trial's values into params.yaml (comments and everything else kept)."""
    values = best_values(load_settings(params).search)
    params.write_text(edit_params(params.read_text(), values))
    load_settings(params)  # still valid
    return values


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.search", description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--apply", action="store_true", help="write the best trial's values into params.yaml")
    args = ap.parse_args(argv)
    telemetry_off()
    t0 = time.perf_counter()
    try:
        if args.apply:
            values = apply()
            print("params.yaml: " + ", ".join(f"{k} = {v!r}" for k, v in values.items()))
            print("next: `trainflow run` trains it; the gate compares it with the champion")
            return
        load_settings()  # bad params stop here, before a Prefect server is started
        with prefect_api(), quiet_failures():
            out = hyperparameter_search(return_state=True).result()  # type: ignore[attr-defined]
    except TrainflowError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    best = out["best"]
    print(f"trials:        {', '.join(f'{n} {k.lower()}' for k, n in out['states'].items())}")
    if best:
        print(f"best:          trial {best['number']}, {out['metric']} {best['value']:.4f}: {best['params']}")
    print(f"experiments:   {len(out['experiments'])} saved (dvc exp show)")
    print(f"report:        {load_settings().search.out_dir}/search.md")
    print(f"wall time:     {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
