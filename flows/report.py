"""What a flow run shows on its page in the Prefect UI: the run summary, the metrics, training progress and
the validation report, as artifacts. Rendering is plain functions of the run's outputs (tested as text);
`publish_*` send them to Prefect.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from tasks.metrics import LOWER_IS_BETTER, NAMES, val_metric

DIRECTION = "lower is better for RMSE, MAE, MAPE, log-loss and ECE; higher for R², accuracy, macro-F1 and ROC-AUC"


def read_json(path: str | Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def table(rows: list[dict]) -> str:
    import pandas as pd  # (imported when a table is written: a run's start does not wait for it)

    return pd.DataFrame(rows).to_markdown(index=False)


def change(metric: str, new: float, old: float | None) -> str:
    """'0.0123 lower: better', '0.0100 higher: worse', 'same' or 'n/a'."""
    if old is None:
        return "n/a"
    if abs(new - old) < 5e-7:
        return "same"
    up = new > old
    better = up != LOWER_IS_BETTER[metric]
    return f"{abs(new - old):.4f} {'higher' if up else 'lower'}: {'better' if better else 'worse'}"


def metrics_rows(metrics: dict, previous: dict | None) -> list[dict]:
    previous = previous or {}
    return [
        {
            "metric": NAMES[k],
            "this run": round(metrics[k], 4),
            "before": None if previous.get(k) is None else round(previous[k], 4),
            "change": change(k, metrics[k], previous.get(k)),
        }
        for k in NAMES
        if metrics.get(k) is not None
    ]


def training_line(training: dict) -> str:
    """Where and how fast training ran; the step time split per step (the run's totals in brackets)."""
    split, steps = training.get("time_split_s", {}), max(1, training.get("steps") or 1)
    per_step = " · ".join(f"{split.get(k, 0) / steps * 1000:.2f} ms {k}" for k in ("data", "compute", "sync"))
    totals = " · ".join(f"{split.get(k, 0):.1f} s {k}" for k in ("data", "compute", "sync"))
    return (
        f"{training['world_size']} rank(s) ({training.get('launcher')}, {training.get('strategy')}, {training.get('precision')} "
        f"on {training.get('device')}), {training['epochs_run']} epochs (best {training['best_epoch']}), "
        f"{training['samples_per_s']:,.0f} samples/s. Time per step: {per_step} (whole run: {totals}; per epoch: "
        "the `training-epochs` artifact)" + recovery(training)
    )


def recovery(training: dict) -> str:
    """The failures training recovered from, and where it resumed."""
    parts = [f"restart {r['attempt']} after a {r['kind']} failure: {r['cause']}" for r in training.get("restarts") or []]
    resumed = training.get("resumed_from")
    if resumed:
        parts.append(f"resumed from `{resumed['checkpoint']}` (epoch {resumed['epoch']}, {resumed['steps']} steps done)")
    return "".join(f"\n- {p}" for p in parts)


def image(path: Path, alt: str) -> str:
    """A PNG inline in markdown (the UI shows it; the file need not be reachable from the browser)."""
    if not path.exists():
        return ""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"


def summary_markdown(run: dict) -> str:
    """The run summary: the outcome first, then metrics, data, training, parameters and stages."""
    stages = run["stages"]
    ran = [name for name, st in stages.items() if st["status"] == "ran"]
    gate = run.get("gate") or {}
    if not ran:
        made = run.get("package_manifest") or {}
        origin = (
            f"Prefect flow run `{made['prefect_flow_run_id']}`"
            if made.get("prefect_flow_run_id")
            else "`dvc repro`"
            if made
            else "an earlier run"
        )
        head = (
            f"# Nothing changed: reused {origin}\n\nEvery stage was up to date in DVC; the model, its package and "
            f"its metrics are those {origin} built{' at ' + made['created'] if made.get('created') else ''}.\n"
        )
    else:
        outcome = {"promote": "promoted", "keep": "not promoted"}.get(str(gate.get("decision")), "done")
        head = f"# Trainflow run: {outcome}\n\n**Gate:** {gate.get('message', 'n/a')}\n"
    where = (
        f"DVC experiment `{run['experiment']}` (`dvc exp show`; `dvc exp apply {run['experiment']}` to use it)"
        if run["experiment"]
        else "the workspace (dvc.lock updated)"
        if ran
        else "the workspace (nothing to update)"
    )
    parts = [
        head,
        f"**Test metrics** ({DIRECTION}):\n",
        table(metrics_rows(run["metrics"] or {}, run["previous_metrics"])) if run["metrics"] else "n/a",
        "",
        f"**Data version (DVC md5 of the raw data):** `{run['data_version']}` · **Results in:** {where}",
        "",
    ]
    if "train" in ran and run.get("training"):
        parts += [f"**Training:** {training_line(run['training'])}", "", run.get("learning_curve") or "", ""]
    changed = "\n".join(f"- `{k}`: {a!r} → {b!r}" for k, (a, b) in run["changed_params"].items()) or "- none (params.yaml)"
    parts += [
        "## Parameters changed from params.yaml",
        changed,
        "",
        f"## Stages ({run['seconds']:.1f} s in all)",
        table([{"stage": k, "status": v["status"], "seconds": round(v["seconds"], 2)} for k, v in stages.items()]),
    ]
    return "\n".join(parts) + "\n"


def publish_summary(run: dict) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    if run["metrics"]:
        create_table_artifact(
            key="metrics",
            table=metrics_rows(run["metrics"], run["previous_metrics"]),
            description=f"Test metrics of this run vs the workspace's previous ones ({DIRECTION})",
        )
    create_markdown_artifact(key="training-summary", markdown=summary_markdown(run), description="Trainflow run summary")


def publish_training(training: dict) -> None:
    """Per epoch, over all ranks: losses, samples/s and where the step time went (only for a run that trained)."""
    from prefect.artifacts import create_table_artifact

    rows = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in e.items()} for e in training["epochs"]]
    create_table_artifact(
        key="training-epochs",
        table=rows,
        description=f"{training.get('world_size')} rank(s), {training.get('launcher')}, {training.get('strategy')}, "
        f"{training.get('precision')}: each epoch's train and validation loss, speed and step time split (seconds)",
    )


def publish_validation(report_md: str | Path) -> None:
    from prefect.artifacts import create_markdown_artifact

    if Path(report_md).exists():  # passed or not
        create_markdown_artifact(
            key="validation-report",
            markdown=Path(report_md).read_text(),
            description="Every expectation of the suite on this run's data",
        )


def publish_iteration(iteration: dict) -> None:
    """Where the loop's seconds went: the table and the Gantt chart (reports/iteration.png)."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.timeline import markdown

    create_markdown_artifact(
        key="iteration",
        markdown=markdown(iteration) + "\n" + iteration.get("chart", ""),
        description="Where this run's seconds went",
    )


class TrainingProgress:
    """A Prefect progress artifact that follows training, one update per epoch (the train stage's on_epoch)."""

    def __init__(self):
        self.id = None

    def __call__(self, record: dict) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        done = 100.0 * record["epoch"] / record["epochs"]
        text = f"epoch {record['epoch']} of at most {record['epochs']}, {val_metric(record)}"
        if self.id is None:
            self.id = create_progress_artifact(done, key="training-progress", description=text)
        else:
            update_progress_artifact(self.id, done, description=text)

    def finish(self) -> None:
        """Early stopping ends before the last epoch: the bar ends full."""
        from prefect.artifacts import update_progress_artifact

        if self.id is not None:
            update_progress_artifact(self.id, 100.0, description="training finished")
