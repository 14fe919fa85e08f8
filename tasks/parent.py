"""The parent of a warm-started run (train.init_from): found, verified and checked against this run's data
before anything in it is used.

A parent is a model package (the champion with `production`, a package directory or its .tar.gz) or a
checkpoint file of the train stage. A package is verified as every package is (tasks/modelpackage.py: every
file against its sha256 in manifest.json, the signature when TRAINFLOW_SIGNING_KEY is set), and its weights
are its `model.pt`, listed in the manifest like every other file. The parent's identity is the sha256 of its
manifest.json (a checkpoint: of the file), recorded in the lineage. Pinned by train.init_sha256, dvc.lock
records it, so DVC reruns preprocess and train when it changes, and a parent replaced behind the same path stops
the run; unpinned (null), the parent is what train.init_from is when the stage runs.

A parent must predict the same thing from the same columns: the same dataset, task, target, target transform,
row split and input columns with their kinds; otherwise the run stops naming what differs. Weights are loaded
with `torch.load(weights_only=True)` only (tasks/training/warmstart.py): nothing in a parent is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import UserError
from tasks.files import sha256_file
from tasks.modelpackage import identity, open_package, split_of
from tasks.paths import champion_path


@dataclass
class Parent:
    path: Path  # where it was found
    kind: str  # "package" or "checkpoint"
    sha256: str  # of the package's manifest.json, or of the checkpoint file
    weights: Path  # the file of weights (torch.save of tensors and plain values)
    transform: dict | None  # a package's transform.json
    lineage: dict  # what the new model's manifest and model card record of it


def location(s) -> Path:
    init = s.train.init_from
    return champion_path(s.evaluate.champion) if init == "production" else Path(init)


@contextmanager
def open_parent(s) -> Iterator[Parent]:
    """train.init_from, verified, pinned and checked against this run's data (a package archive's temporary
    copy is removed on exit)."""
    path = location(s)
    if not path.exists():
        raise UserError(
            f"train.init_from={s.train.init_from}: {path} does not exist"
            + (
                " (no champion yet for this dataset: train from scratch first, train.init_from: null)"
                if s.train.init_from == "production"
                else ""
            )
        )
    if path.is_file() and not path.name.endswith((".tar.gz", ".tgz")):
        yield checkpoint_parent(s, path)
        return
    with open_package(path) as package:
        manifest, directory = package.manifest, package.directory
        sha = sha256_file(directory / "manifest.json")
        if "model.pt" not in manifest["files"]:
            raise UserError(
                f"train.init_from: {path} holds no model.pt (packages built before warm start carry the ONNX model "
                "only, which is not trained further); rebuild it with this version (dvc repro package), or start from "
                "its run's checkpoint"
            )
        check_pin(s, sha, path, "the sha256 of its manifest.json")
        check_same(s, identity({**manifest, "transform": package.transform}), path)
        lineage = {
            "kind": "package",
            "path": str(s.train.init_from),
            "package_sha256": sha,
            "dataset": manifest["data"]["dataset"],
            "rows": manifest["data"]["rows"],
            "created": manifest.get("created"),
            "prefect_flow_run_id": manifest.get("prefect_flow_run_id"),
            "git_commit": (manifest.get("git") or {}).get("commit"),
            "metrics": {k: v for k, v in manifest.get("metrics", {}).items() if isinstance(v, int | float)},
        }
        yield Parent(path, "package", sha, directory / "model.pt", package.transform, lineage)


def checkpoint_parent(s, path: Path) -> Parent:
    """A checkpoint file: its sha256 (against the .sha256 the train stage writes beside a checkpoint, if any)."""
    sha = sha256_file(path)
    beside = path.with_suffix(".sha256")
    if beside.exists() and beside.read_text().strip() != sha:
        raise UserError(
            f"train.init_from: {path} does not match its {beside.name}: corrupt or truncated; pick another checkpoint"
        )
    check_pin(s, sha, path, "the sha256 of the file")
    if s.train.init_transform == "reuse":
        raise UserError(
            f"train.init_from: {path} is a checkpoint, which carries no feature transform to reuse; set "
            "train.init_transform: refit, or start from the package of that run"
        )
    return Parent(path, "checkpoint", sha, path, None, {"kind": "checkpoint", "path": str(s.train.init_from), "sha256": sha})


def check_pin(s, sha: str, path: Path, what: str) -> None:
    """With train.init_sha256 set, the parent must be that one. Unset, the parent is whatever train.init_from is
    when the stage runs (a scheduled run's `production`: the champion of the day), recorded in the lineage;
    DVC then reruns for new data or params, not for a new parent alone."""
    pinned = s.train.init_sha256
    if pinned is None:
        print(
            f"train.init_from: {path} has sha256 {sha} ({what}); recorded in the model's lineage. Not pinned: "
            f"set train.init_sha256: {sha} to have dvc.lock record it and DVC rerun when the parent changes"
        )
        return
    if pinned != sha:
        raise UserError(
            f"train.init_from: {path} has sha256 {sha}, not train.init_sha256={pinned}: the parent changed (a new "
            f"champion was promoted, or the file was replaced). To start from it, set train.init_sha256: {sha} "
            "(or null, to follow train.init_from as it is when the run starts)"
        )


def here(s) -> dict:
    """This run's identity, as modelpackage.identity gives a package's."""
    d = s.dataset
    return {
        "dataset": d.name,
        "task": d.task,
        "target": d.target,
        "target_transform": d.target_transform,
        "split": split_of(s),
        "inputs": {c: k for c, k in d.columns.items() if k != "ignore"},
    }


def check_same(s, there: dict, path: Path) -> None:
    """Stop, naming every difference (the columns one by one), unless the parent predicts this run's target
    from this run's columns, split the same way."""
    mine, differ = here(s), []
    for k in ("dataset", "task", "target", "target_transform", "split"):
        if there.get(k) != mine[k]:
            differ.append(f"{k}: {json.dumps(there.get(k), default=str)} there, {json.dumps(mine[k], default=str)} here")
    a, b = there.get("inputs") or {}, mine["inputs"]
    columns = [f"{c} only there ({a[c]})" for c in a if c not in b] + [f"{c} only here ({b[c]})" for c in b if c not in a]
    columns += [f"{c} {a[c]} there, {b[c]} here" for c in a if c in b and a[c] != b[c]]
    if columns:
        differ.append("columns: " + ", ".join(columns))
    if differ:
        raise UserError(
            f"train.init_from: {path} is a model of other data ({'; '.join(differ)}); its weights cannot start this run. "
            "Point train.init_from at a model of this dataset and columns, or set it to null to train from scratch"
        )


def reused_transform(s) -> tuple[dict, dict] | None:
    """train.init_transform reuse: the parent's transform.json (which preprocess applies instead of fitting one)
    and where it came from; None when the transform is fitted on this data."""
    if not s.train.init_from or s.train.init_transform != "reuse":
        return None
    with open_parent(s) as parent:
        assert parent.transform is not None  # (a checkpoint with reuse is refused by open_parent)
        return parent.transform, {"path": s.train.init_from, "package_sha256": parent.sha256}


def check_features(s, transform: dict) -> None:
    """Before training: the parent is usable, and with reuse, the features were encoded with its transform."""
    with open_parent(s) as parent:
        if s.train.init_transform == "reuse" and parent.transform != transform:
            raise UserError(
                f"train.init_transform=reuse: the features in {s.preprocess.out_dir} were not encoded with the transform "
                f"of {parent.path}; rerun the preprocess stage (dvc repro does), which applies it"
            )
