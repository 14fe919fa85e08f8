"""Where a loop's seconds go: the iteration report (issue 18).

Every stage run records its part, `.dvc/tmp/iteration/<stage>.json`: when it started and ended and its
phases (imports before the stage function, a Dask cluster's start, training's epochs, ...). The runner
combines the parts with its own phases (Prefect server start, DVC status and commit per stage, `dvc repro`'s
own time) into `reports/iteration.json` (the loop's wall, its stage work and their ratio: a DVC metric, so `dvc exp show`
compares loop times), `reports/iteration.timeline.json` (per stage: wall, ran or cached, start-up, rows/s or
samples/s, training's data/compute/sync split; every phase's span) and `reports/iteration.png` (a Gantt
chart of the same).

`dvc repro`: each stage's command (`tasks.settings.cli`) records its part and rewrites the report, so it is
whole after the last stage that ran; a stage whose part predates the `dvc repro` process is cached. The
flow: `flows/pipeline.py` records the parts in-process and writes the report once, at the end.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

PARTS = Path(".dvc/tmp/iteration")
REPORT, CHART = Path("reports/iteration.json"), Path("reports/iteration.png")
DETAILS = Path("reports/iteration.timeline.json")  # per stage and phase (the metric file holds the totals)
TOTALS = {"loop_s": "wall_s", "work_s": "work_s", "useful": "useful_fraction"}  # metric name: report key
STAGES = ("ingest", "validate", "preprocess", "train", "evaluate", "package", "promote")

_phases: list[dict] = []  # this process's phases: {"stage", "phase", "start", "end"} (epoch seconds)
_stage: str | None = None


@contextmanager
def phase(name: str, stage: str | None = None):
    """Time a phase of the current stage (or of the runner when no stage runs)."""
    start = time.time()
    try:
        yield
    finally:
        _phases.append({"stage": stage or _stage or "runner", "phase": name, "start": start, "end": time.time()})


def add(name: str, start: float, end: float, stage: str | None = None) -> None:
    _phases.append({"stage": stage or _stage or "runner", "phase": name, "start": start, "end": end})


_flow_pending: float | None = None


def process_started() -> None:
    """`trainflow run`: this process's imports so far, and from now until the flow starts, the server's start."""
    import psutil

    global _flow_pending
    now = time.time()
    add("imports", psutil.Process().create_time(), now, "runner")
    _flow_pending = now


def flow_started() -> float:
    """The flow function starts: the loop's start (the process's, under `trainflow run`). The time since
    process_started that no runner phase accounts for (imports and DVC's status, done while the server starts)
    was the wait for the server."""
    global _flow_pending
    now, waited_from = time.time(), _flow_pending
    if waited_from is None:
        return now
    for start, end in sorted((p["start"], p["end"]) for p in _phases if p["stage"] == "runner" and p["start"] >= waited_from):
        if start > waited_from:
            add("server start", waited_from, start, "runner")
        waited_from = max(waited_from, end)
    if now > waited_from:
        add("server start", waited_from, now, "runner")
    _flow_pending = None
    return min(p["start"] for p in _phases if p["stage"] == "runner")


def phases_of(stage: str) -> list[dict]:
    return [p for p in _phases if p["stage"] == stage]


@contextmanager
def recording(stage: str, root: Path = Path("."), process_start: float | None = None):
    """Run a stage; when it succeeds, write its part: its span and phases (and, in a fresh process, the
    imports before it)."""
    global _stage
    _stage, start = stage, time.time()
    if process_start is not None:
        add("imports", process_start, start, stage)
    try:
        yield
    finally:
        _stage = None
    part = {"stage": stage, "start": process_start or start, "end": time.time(), "phases": phases_of(stage)}
    path = root / PARTS / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(part))
    tmp.replace(path)


def loop_origin(stage: str) -> tuple[str, float]:
    """The command this stage process belongs to and when it started: `dvc repro` / `dvc exp run` (an
    ancestor process), else this process (a stage run by hand)."""
    import psutil

    me = psutil.Process()
    for ancestor in me.parents():
        try:
            words = [Path(w).name for w in ancestor.cmdline()[:4]]
        except psutil.Error:
            continue
        if "dvc" in words and ("repro" in words or "exp" in words):
            return "dvc " + " ".join(words[words.index("dvc") + 1 :][:2]), ancestor.create_time()
    return f"python -m tasks.{stage}", me.create_time()


def read_parts(root: Path) -> dict[str, dict]:
    """The parts the stages recorded last, by stage."""
    parts = {}
    for name in STAGES:
        try:
            parts[name] = json.loads((root / PARTS / f"{name}.json").read_text())
        except (OSError, ValueError):
            continue
    return parts


def stage_command(stage: str, run, s) -> None:
    """`python -m tasks.<stage>` (what `dvc repro` runs): run the stage recording its part, then rewrite the
    loop's report from the parts of the stages this `dvc repro` ran so far, DVC's own time being the gaps."""
    import psutil

    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a rank torchrun started: the stage process that ran torchrun reports
        run()
        return
    with recording(stage, process_start=psutil.Process().create_time()):
        run()
    runner, start = loop_origin(stage)
    parts = {name: part for name, part in read_parts(Path(".")).items() if part["start"] >= start}  # this loop's
    previous = start
    for part in sorted(parts.values(), key=lambda p: p["start"]):
        add("dvc", previous, part["start"], "runner")
        previous = part["end"]
    try:
        write(Path("."), combine(Path("."), s, runner, start, time.time(), parts))
    except Exception as e:  # the stage succeeded; a report it could not write must not fail it
        print(f"warning: the iteration report was not written ({type(e).__name__}: {e})", file=sys.stderr)


def throughput(stage: str, root: Path, s) -> dict:
    """Rows/s or samples/s of a stage, from its own outputs."""

    def read(p) -> dict:
        try:
            return json.loads((root / p).read_text())
        except (OSError, ValueError):
            return {}

    if stage == "train":
        t = read(Path(s.train.out_dir) / "summary.json")
        return {
            "samples_per_s": t.get("samples_per_s"),
            "split_s": t.get("time_split_s"),
            "epochs_s": t.get("seconds"),
            "epochs_wall": t.get("epochs_wall"),  # (not reported: the epochs' phase)
        }
    if stage == "preprocess":
        return {"rows": sum((read(Path(s.preprocess.out_dir) / "schema.json").get("rows") or {}).values())}
    if stage == "validate":
        return {"rows": (read(s.validate_.report).get("rows") or {}).get("input")}
    if stage == "evaluate":
        return {"rows": read(Path(s.evaluate.out_dir) / "metrics.json").get("n")}
    return {}


def combine(root: Path, s, runner: str, start: float, end: float, parts: dict[str, dict]) -> dict:
    """The report of one loop from `start` to `end`: the parts of the stages that ran, the runner's phases."""
    stages: dict[str, dict] = {}
    spans: list[dict] = []
    for name in STAGES:
        part = parts.get(name)
        if part is None:
            stages[name] = {"status": "cached"}
            continue
        speed = {k: v for k, v in throughput(name, root, s).items() if v is not None}
        phases = part["phases"]
        epochs = speed.pop("epochs_wall", None)  # the ranks' epochs (in this process or others), from the summary
        if epochs and part["start"] <= epochs[0] <= part["end"]:
            phases = phases + [{"stage": name, "phase": "epochs", "start": epochs[0], "end": epochs[1]}]
        startup = sum(p["end"] - p["start"] for p in phases if p["phase"] in ("imports", "cluster start"))
        wall = part["end"] - part["start"]
        entry = {"status": "ran", "wall_s": round(wall, 3), "startup_s": round(startup, 3), "work_s": round(wall - startup, 3)}
        entry |= speed
        if entry.get("rows") and entry["work_s"] > 0:
            entry["rows_per_s"] = round(entry["rows"] / entry["work_s"])
        stages[name] = entry
        spans.append({"stage": name, "phase": "stage", "start": part["start"], "end": part["end"]})
        spans += phases
    runner_phases = [p for p in _phases if p["stage"] == "runner" and p["end"] >= start]
    spans += runner_phases
    work = sum(v.get("work_s", 0) for v in stages.values())
    wall = end - start
    overhead: dict[str, float] = {}
    for p in runner_phases:
        overhead[p["phase"]] = round(overhead.get(p["phase"], 0) + p["end"] - p["start"], 3)
    for v in stages.values():
        if v.get("startup_s"):
            overhead["stage start-up"] = round(overhead.get("stage start-up", 0) + v["startup_s"], 3)
    report = {
        "runner": runner,
        "wall_s": round(wall, 3),
        "work_s": round(work, 3),
        "overhead_s": round(wall - work, 3),
        "useful_fraction": round(work / wall, 4) if wall > 0 else None,
        "ran": [n for n in STAGES if stages[n]["status"] == "ran"],
        "overhead": overhead,
        "stages": stages,
        "timeline": [
            {
                "stage": p["stage"],
                "phase": p["phase"],
                "start_s": round(p["start"] - start, 3),
                "end_s": round(p["end"] - start, 3),
            }
            for p in sorted(spans, key=lambda p: p["start"])
        ],
    }
    return report


def write(root: Path, report: dict) -> None:
    from tasks.files import atomic_path, write_json

    write_json(root / REPORT, {k: report[v] for k, v in TOTALS.items()})  # `dvc metrics show` / `dvc exp show`: 3 columns
    write_json(root / DETAILS, report)
    with atomic_path(root / CHART) as tmp:
        gantt(report, tmp)


COLORS = {
    "stage": "#4c72b0",
    "imports": "#dd8452",
    "cluster start": "#c44e52",
    "epochs": "#55a868",
    "server start": "#8172b3",
    "dvc status": "#937860",
    "dvc commit": "#da8bc3",
    "dvc experiment": "#c4ad66",
    "dvc": "#937860",
}


def gantt(report: dict, path: Path) -> None:
    """One row per stage (and one for the runner): the stage's span, its phases drawn over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["runner", *[n for n in STAGES if report["stages"][n]["status"] == "ran"]]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.6))
    seen = set()
    for span in report["timeline"]:
        if span["stage"] not in rows:
            continue
        y = len(rows) - 1 - rows.index(span["stage"])
        height = 0.7 if span["phase"] == "stage" else 0.4
        color = COLORS.get(span["phase"], "#8c8c8c")
        label = span["phase"] if span["phase"] not in seen else None
        seen.add(span["phase"])
        ax.barh(y, span["end_s"] - span["start_s"], left=span["start_s"], height=height, color=color, label=label)
    ax.set_yticks(range(len(rows)), list(reversed(rows)))
    ax.set_xlabel("seconds from the start of the loop")
    ax.set_title(
        f"{report['runner']}: {report['wall_s']:.1f} s, of which stage work {report['work_s']:.1f} s "
        f"({100 * (report['useful_fraction'] or 0):.0f}%)"
    )
    below = (0.5, -0.18 - 0.3 / len(rows))
    ax.legend(loc="upper center", bbox_to_anchor=below, fontsize=8, ncol=max(1, len(seen)), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def markdown(report: dict) -> str:
    """The report as the Prefect artifact's table."""
    lines = [
        f"**Loop:** {report['wall_s']:.1f} s, stage work {report['work_s']:.1f} s, overhead {report['overhead_s']:.1f} s "
        f"({', '.join(f'{k} {v:.1f} s' for k, v in report['overhead'].items()) or 'none measured'})",
        "",
        "| stage | status | wall s | start-up s | work s | throughput |",
        "|---|---|---|---|---|---|",
    ]
    process = report.get("process") or {}
    if process.get("warm"):
        restarts = process.get("restarts", 0)
        restarted = f" after {restarts} restart(s) for code changes" if restarts else ""
        lines[1:1] = [
            "",
            f"**Warm process:** forked from `trainflow serve`'s warm process (started {process.get('since', '?')}{restarted}): "
            f"{', '.join(process['imported']) or 'nothing'} already imported when the run started.",
        ]
    cached = [n for n, v in report["stages"].items() if v["status"] == "cached"]
    if cached:
        lines[1:1] = ["", f"**Reused, up to date in DVC:** {', '.join(cached)} (their outputs from DVC's cache, not recomputed)."]
    for name, v in report["stages"].items():
        speed = (
            f"{v['samples_per_s']:,.0f} samples/s"
            if v.get("samples_per_s")
            else f"{v['rows_per_s']:,} rows/s"
            if v.get("rows_per_s")
            else ""
        )
        if v.get("split_s"):
            speed += " (" + " · ".join(f"{k} {t:.1f} s" for k, t in v["split_s"].items()) + ")"
        lines.append(
            f"| {name} | {v['status']} | {v.get('wall_s', '')} | {v.get('startup_s', '')} | {v.get('work_s', '')} | {speed} |"
        )
    return "\n".join(lines) + "\n"
