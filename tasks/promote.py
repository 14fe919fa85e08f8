"""Promote the packaged candidate to champion when the evaluate stage's gate said so.  Run: python -m tasks.promote

The champion (evaluate.champion, e.g. models/production) is a link to a version directory named by the
sha256 of its manifest.json: `models/.production.versions/<sha256>/`, beside `<sha256>.json` (when and why it
was promoted). Promotion copies the package into a new version directory, then switches the link with one
rename, so a crash at any moment leaves the old champion or the new one in place, never none. The link's
target is the record the champion is verified against (tasks/modelpackage.py): a champion whose files or
manifest were altered afterwards is refused. `<champion>.previous` links to the champion before, for a
rollback (`ln -sfn .production.versions/<sha256> models/production`); the last KEEP versions are kept.

Each dataset and target has its own champion: `models/.production.datasets/<dataset>--<target>` links to its
version too, and `trainflow use NAME` switches `models/production` to the new dataset's champion (or leaves
none, when it has none yet), so a model is only ever gated against one of the same dataset.

Promotion happens only if the package is the model the gate scored and the champion is still the one it
was compared with. When the gate kept the champion, nothing changes and the reason is printed.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

from tasks.champions import dataset_key, dataset_versions, datasets_dir, switch
from tasks.errors import UserError
from tasks.files import sha256_file, write_json
from tasks.modelpackage import champion_record, verified, versions_dir
from tasks.paths import champion_path
from tasks.settings import Settings, cli

KEEP = 3  # version directories kept (the champion's and its predecessor's always)


def promote(s: Settings) -> dict:
    gate_path = Path(s.evaluate.out_dir) / "gate.json"
    if not gate_path.exists():
        raise UserError(f"promote: {gate_path} does not exist; run the evaluate stage first")
    gate = json.loads(gate_path.read_text())
    champion = champion_path(s.evaluate.champion)
    if gate["decision"] != "promote":
        print(gate["message"])
        return {"promoted": False, "message": gate["message"], "champion": str(champion)}

    package, manifest = verified(Path(s.package.out_dir))  # every file checked
    evaluated = json.loads((Path(s.evaluate.out_dir) / "metrics.json").read_text())
    if manifest["metrics"].get(gate["primary"]) != evaluated.get(gate["primary"]):
        raise UserError(
            f"promote: {s.package.out_dir} is not the model the gate scored (its {gate['primary']} "
            f"{manifest['metrics'].get(gate['primary'])} vs {evaluated.get(gate['primary'])}); rerun "
            "the package stage"
        )
    version = sha256_file(package / "manifest.json")
    now = champion_record(champion) if champion.is_symlink() or champion.exists() else None
    message = gate["message"].replace("promote:", "promoted:", 1)
    if now is not None and same_model(verified(champion)[1], manifest):
        # promoted already: a run killed after the switch and run again, or the same model packaged anew
        print(f"{message} (already the champion)")
        return {"promoted": True, "message": message, "champion": str(champion)}
    if now != (gate.get("champion") or {}).get("manifest_sha256"):
        raise UserError(
            f"promote: {champion} changed since the gate compared against it; rerun the evaluate stage "
            "(dvc repro -f evaluate, or run the flow again)"
        )
    install(
        package,
        champion,
        dataset_key(s.dataset.name, s.dataset.target),
        version,
        {
            "promoted": datetime.now(UTC).isoformat(timespec="seconds"),
            "manifest_sha256": version,
            "previous": now,
            "gate": {k: gate[k] for k in ("message", "primary", "candidate", "reference", "improvement", "against")},
        },
    )
    print(message)
    return {"promoted": True, "message": message, "champion": str(champion)}


def same_model(a: dict, b: dict) -> bool:
    """Two manifests of the same model: the same network and the same feature transform."""
    return all(a["files"].get(f) == b["files"].get(f) for f in ("model.onnx", "transform.json"))


def install(package: Path, champion: Path, dataset: str, version: str, record: dict) -> None:
    """Copy the package to its version directory, then switch the champion's link to it in one rename (and the
    dataset's own link after it)."""
    versions = versions_dir(champion)
    versions.mkdir(parents=True, exist_ok=True)
    for stale in champion.parent.glob(f".{champion.name}*.link"):  # from promotions that were killed
        stale.unlink(missing_ok=True)
    target = versions / version
    if not target.exists():
        staged = versions / f".{version}.{os.getpid()}.tmp"
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(package, staged)
        os.replace(staged, target)
    write_json(versions / f"{version}.json", record)
    previous = Path(os.readlink(champion)) if champion.is_symlink() else None
    switch(champion, Path(versions.name) / version)  # the one step that changes the champion
    if previous is not None:
        switch(champion.with_name(f"{champion.name}.previous"), previous)
    per_dataset = datasets_dir(champion)
    per_dataset.mkdir(exist_ok=True)
    switch(per_dataset / dataset, Path("..") / versions.name / version)
    prune(versions, keep={version, previous.name if previous else None} | dataset_versions(champion))


def prune(versions: Path, keep: set) -> None:
    """Drop the oldest version directories beyond KEEP (never the champion's or its predecessor's), and the
    leftovers of promotions that were killed."""
    for leftover in versions.glob(".*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    done = sorted((d for d in versions.iterdir() if d.is_dir() and len(d.name) == 64), key=lambda d: d.stat().st_mtime)
    for old in done[:-KEEP]:
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
            (versions / f"{old.name}.json").unlink(missing_ok=True)


if __name__ == "__main__":
    cli(promote)
