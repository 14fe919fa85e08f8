"""Serve the `training-pipeline` deployment from this machine, on the schedule in prefect.yaml.

Run in the project root: python -m flows.serve   (needs PREFECT_API_URL, e.g. http://127.0.0.1:4200/api)

Runs are executed here, one at a time. Stopping this process pauses the deployment (no run is queued
for nobody); starting it again resumes it with the same schedule, which lives in the server's database.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect.schedules import Cron

from flows.pipeline import training_pipeline

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


def deployment_spec(name: str = "training-pipeline") -> dict:
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    return next(d for d in spec["deployments"] if d["name"] == name)


def main() -> None:
    spec = deployment_spec()
    training_pipeline.serve(
        name=spec["name"],
        description=spec["description"],
        schedules=[Cron(s["cron"], timezone=s.get("timezone", "UTC")) for s in spec["schedules"]],
        limit=1,  # one run at a time: a second waits instead of racing for the workspace
    )


if __name__ == "__main__":
    main()
