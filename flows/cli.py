"""`trainflow`: one command for everything a user does with the pipeline. Every command's settings come from
params.yaml in the working directory (the project root); `--help` on any command prints help and runs nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

app = typer.Typer(
    help=__doc__,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command()
def run() -> None:
    """Run the whole pipeline on params.yaml as a Prefect flow run (stages DVC finds up to date are skipped)."""
    from flows.pipeline import main

    main([])


@app.command()
def server(stop: Annotated[bool, typer.Option("--stop", help="stop it")] = False) -> None:
    """The local Prefect server that `trainflow run` starts on first use and reuses (its UI lists every run):
    where it is, or --stop."""
    from flows.server import running_server, stop_local_server

    if stop:
        print(stop_local_server())
        return
    record = running_server()
    print(
        f"Prefect server: {record['url'].removesuffix('/api')} (UI; PID {record['pid']}); stop: trainflow server --stop"
        if record
        else "no local Prefect server is running; `trainflow run` starts one (or `trainflow ui` in the foreground)"
    )


@app.command()
def serve() -> None:
    """Serve the training-pipeline (on its schedule), batch-predict and hyperparameter-search deployments from this machine
    (PREFECT_API_URL must point at a server: see `trainflow ui`)."""
    from flows.serve import main

    main([])


@app.command()
def stage(
    name: Annotated[
        str, typer.Argument(help="a stage of dvc.yaml: ingest, validate, preprocess, train, evaluate, package or promote")
    ],
) -> None:
    """Run one stage on params.yaml, as `dvc repro` runs it (without DVC's bookkeeping)."""
    import importlib

    import yaml

    from tasks.settings import cli

    stages = list((yaml.safe_load(Path("dvc.yaml").read_text()) or {}).get("stages", {})) if Path("dvc.yaml").exists() else []
    if name not in stages:
        raise typer.BadParameter(
            f"{name!r} is not a stage of dvc.yaml here ({', '.join(stages) or 'no dvc.yaml'})", param_hint="NAME"
        )
    cli(getattr(importlib.import_module(f"tasks.{name}"), name), [])


@app.command()
def predict(
    package: Annotated[str, typer.Argument(help="a package directory or .tar.gz (e.g. models/production)")],
    input: Annotated[str, typer.Argument(help="a CSV or Parquet file, or a directory of Parquet files")],
    output: Annotated[str, typer.Argument(help="where the predictions go: a .parquet or .csv file")],
    rejects: Annotated[str | None, typer.Option(help="rows that failed validation (default: OUTPUT's name + .rejects)")] = None,
    flow: Annotated[bool, typer.Option("--flow", help="as a batch-predict Prefect flow run")] = False,
) -> None:
    """Score a file with a model package: every row checked against the package's suite, bad rows set aside."""
    if flow:
        from flows.predict import main as flow_main

        flow_main([package, input, output] + (["--rejects", rejects] if rejects else []))
        return
    from tasks.predict import main as predict_main

    predict_main([package, input, output] + (["--rejects", rejects] if rejects else []))


@app.command()
def use(
    dataset: Annotated[str, typer.Argument(help="a name in data/datasets/ (california_housing, flights) or a dataset YAML")],
) -> None:
    """Make a dataset the one params.yaml trains on (its `dataset:` section replaces params.yaml's)."""
    from tasks.datasets import main

    main(["use", dataset])


dataset = typer.Typer(
    help="Datasets: `trainflow dataset new FILE --target COL` drafts one from a file, to review.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(dataset, name="dataset")


@dataset.command("new")
def dataset_new(
    file: Annotated[str, typer.Argument(help="a CSV or Parquet file")],
    target: Annotated[str, typer.Option(help="the column to predict")],
    name: Annotated[str | None, typer.Option(help="the dataset's name (default: the file's name)")] = None,
    task: Annotated[Literal["auto", "regression", "binary", "multiclass"], typer.Option(help="what is predicted")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="replace existing files of that name")] = False,
) -> None:
    """Draft data/datasets/NAME.yaml and data/suites/NAME.yaml from a file (each column's kind and why, the
    task, a key, slices, the suite's bounds), print what to review, then `trainflow use NAME`."""
    from tasks.draft import main as draft_main

    draft_main([file, "--target", target, "--task", task] + (["--name", name] if name else []) + (["--force"] if force else []))


@app.command()
def search(
    apply: Annotated[
        bool, typer.Option("--apply", help="write the best trial's values into params.yaml, and run nothing")
    ] = False,
) -> None:
    """Hyperparameter search: an Optuna study over params.yaml's search.space, its trials on Dask workers, each
    complete one a DVC experiment (a killed search resumes); --apply writes the best trial's values into
    params.yaml, so the next `trainflow run` trains it and the gate judges it."""
    from flows.search import main

    main(["--apply"] if apply else [])


@app.command()
def status() -> None:
    """What DVC would rerun and why, the champion, and the last run's results."""
    from flows.status import show

    sys.exit(show())


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="the port to serve on")] = 4200,
    host: Annotated[str, typer.Option(help="the address to listen on (127.0.0.1: this machine only)")] = "127.0.0.1",
) -> None:
    """Start a local Prefect server with its UI (until Ctrl-C) and say how to use it."""
    url = f"http://{host}:{port}"
    env = dict(os.environ, PREFECT_UI_API_URL=f"{url}/api", PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    print(
        f"Prefect UI: {url}\nIn another shell: export PREFECT_API_URL={url}/api, then `trainflow serve` or `trainflow run`.",
        flush=True,
    )
    prefect = Path(sys.executable).with_name("prefect")
    cmd = [
        str(prefect) if prefect.exists() else "prefect",
        "server",
        "start",
        "--host",
        host,
        "--port",
        str(port),
        "--analytics-off",
    ]
    try:
        sys.exit(subprocess.call(cmd, env=env))
    except KeyboardInterrupt:
        sys.exit(0)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
