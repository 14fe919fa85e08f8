"""`trainflow status`: what DVC would rerun and why, the champion, and the last run's results, in one screen."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import yaml

from tasks.errors import UserError
from tasks.settings import PARAMS, load_settings


def changed_keys(stage: str, lock: dict, params: dict) -> list[str]:
    """The params.yaml keys of a stage whose value differs from what dvc.lock recorded."""
    recorded = ((lock.get(stage) or {}).get("params") or {}).get(PARAMS, {})
    out = []
    for key, old in recorded.items():
        node = params
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else None
        if isinstance(old, dict) and isinstance(node, dict):
            out += [f"{key}.{k}" for k in sorted(set(old) | set(node)) if old.get(k) != node.get(k)]
        elif old != node:
            out.append(key)
    return out


def reasons(stage: str, changes: list, lock: dict, params: dict) -> list[str]:
    """DVC's status entries of a stage, in words, grouped: 'params changed: train.lr; deps modified: a, b'."""
    if stage not in lock:
        return ["never run (dvc.lock has no record of it)"]
    grouped: dict[str, list[str]] = {}
    for change in changes:
        if not isinstance(change, dict):
            grouped.setdefault(str(change), [])
            continue
        for kind, items in change.items():
            for path, what in (items or {}).items():
                if path == PARAMS:
                    grouped.setdefault("params changed", []).extend(changed_keys(stage, lock, params) or [PARAMS])
                else:
                    grouped.setdefault(f"{kind.removeprefix('changed ')} {what}", []).append(path)
    return [f"{kind}: {', '.join(paths)}" if paths else kind for kind, paths in grouped.items()]


def pipeline_status() -> list[tuple[str, str]]:
    from flows.workspace import Workspace

    ws = Workspace(Path.cwd())
    lock_file = ws.root / "dvc.lock"
    lock = (yaml.load(lock_file.read_text(), Loader=yaml.CSafeLoader) or {}).get("stages", {}) if lock_file.exists() else {}
    params = yaml.safe_load((ws.root / PARAMS).read_text())
    status = ws.repo.status()
    stages = list((yaml.safe_load((ws.root / "dvc.yaml").read_text()) or {}).get("stages", {}))
    rows, upstream = [], None
    for stage in stages:
        if stage in status:
            why = "; ".join(reasons(stage, status[stage], lock, params)) or "changed"
            rows.append((stage, f"reruns: {why}"))
            upstream = upstream or stage
        elif upstream:
            rows.append((stage, f"reruns after {upstream} (its inputs change)"))
        else:
            rows.append((stage, "up to date"))
    return rows


def champion_status(champion: Path) -> str:
    from tasks.modelpackage import champion_record, versions_dir

    if not champion.exists() and not champion.is_symlink():
        return f"{champion}: none yet (the next model that beats the train-mean baseline becomes the champion)"
    try:
        version = champion_record(champion)
    except UserError as e:
        return str(e)
    record = (
        json.loads((versions_dir(champion) / f"{version}.json").read_text())
        if (versions_dir(champion) / f"{version}.json").exists()
        else {}
    )
    manifest = json.loads((champion / "manifest.json").read_text())
    m = manifest.get("metrics", {})
    return (
        f"{champion} -> version {version[:12]}, promoted {record.get('promoted', '?')}: "
        f"test {headline(m)}, "
        f"trained on {manifest.get('data', {}).get('dataset')} ({manifest.get('created')})"
    )


def last_run(s) -> list[str]:
    out = []
    metrics, gate = Path(s.evaluate.out_dir) / "metrics.json", Path(s.evaluate.out_dir) / "gate.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        when = datetime.fromtimestamp(os.path.getmtime(metrics), UTC).isoformat(timespec="seconds")
        out.append(f"evaluated {when}: test {headline(m)}  (n={m['n']:,})")
    if gate.exists():
        out.append(f"gate: {json.loads(gate.read_text())['message']}")
    summary = Path(s.train.out_dir) / "summary.json"
    if summary.exists():
        t = json.loads(summary.read_text())
        out.append(
            f"trained {t['epochs_run']} epochs (best {t['best_epoch']}) in {t['seconds']:.1f} s on {t['world_size']} rank(s)"
        )
    manifest = Path(s.package.out_dir) / "manifest.json"
    if manifest.exists():
        p = json.loads(manifest.read_text())
        out.append(
            f"package {s.package.out_dir} built {p.get('created')}"
            + (f" by Prefect flow run {p['prefect_flow_run_id']}" if p.get("prefect_flow_run_id") else "")
        )
    return out or ["no run yet: `trainflow run` or `dvc repro`"]


def show() -> int:
    from rich.console import Console
    from rich.table import Table

    from tasks.paths import champion_path

    console = Console()
    try:
        s = load_settings()
        rows = pipeline_status()
    except UserError as e:
        console.print(f"error: {e}", style="red", markup=False)
        return 2
    table = Table("stage", "status", title="Pipeline (what `dvc repro` or `trainflow run` would do)", title_justify="left")
    for stage, what in rows:
        table.add_row(stage, what, style=None if what == "up to date" else "yellow")
    console.print(table)
    console.print(f"Champion: {champion_status(champion_path(s.evaluate.champion))}", markup=False)
    console.print("Last run:", markup=False)
    for line in last_run(s):
        console.print(f"  {line}", markup=False)
    return 0


def headline(m: dict) -> str:
    """The test metrics a person reads first: 'RMSE 0.5006  MAE 0.3296  R² 0.8096'."""
    from tasks.metrics import NAMES, shown

    return "  ".join(f"{NAMES[k]} {m[k]:.4f}" for k in shown(m)[:4]) or "no metrics"
