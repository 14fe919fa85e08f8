"""Serve Trainflow's deployments from this machine: `training-pipeline` on the schedule in prefect.yaml, and
`batch-predict` on demand.  Run in the project root: trainflow serve (or python -m flows.serve), with
PREFECT_API_URL set (e.g. http://127.0.0.1:4200/api; `trainflow ui` starts a server).

Runs are executed here. Each deployment's concurrency limit is 1 (prefect.yaml's), so a second run of it
waits in the queue instead of racing for the workspace. Stopping this process pauses the deployments (no
run is queued for nobody); starting it again resumes them with the same schedule, which lives in the
server's database.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


def deployment_spec(name: str) -> dict:
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    return next(d for d in spec["deployments"] if d["name"] == name)


def deployments() -> list:
    from prefect.schedules import Cron

    from flows.pipeline import build
    from flows.predict import batch_predict

    out = []
    for flow in (build(Path("params.yaml").resolve()), batch_predict):
        spec = deployment_spec(flow.name)
        out.append(
            flow.to_deployment(
                name=spec["name"],
                description=spec["description"],
                concurrency_limit=spec.get("concurrency_limit"),
                schedules=[Cron(s["cron"], timezone=s.get("timezone", "UTC")) for s in spec.get("schedules") or []],
            )
        )
    return out


def main(argv: list[str] | None = None) -> None:
    """`trainflow serve`: serve the training-pipeline (scheduled) and batch-predict deployments here."""
    argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0]).parse_args(argv)
    from prefect import serve

    from flows.server import telemetry_off

    telemetry_off()
    serve(*deployments())


if __name__ == "__main__":
    main()
