"""Build the self-contained model package.  Run: python -m tasks.package

The package directory holds:
- model.onnx: the network with target de-standardisation built in. ONNX because it is portable (runs
  with onnxruntime in any language, no torch or Python needed at serving time), it holds no pickled code,
  and onnxruntime reproduces torch within ~1e-7. Exported with the torch.export-based exporter (dynamo).
- transform.json: the feature transform fitted by preprocess (the same file, the same apply code).
- model.pt: the train stage's model file (weights and plain metadata, read with weights_only): what a warm
  start (train.init_from) continues from; listed and checked like every file.
- suite.yaml: the expectation suite the training data passed.
- MODEL_CARD.md: data, metrics with slices, intended use, limitations, how it was trained.
- manifest.json: params, data hashes (DVC's too), git commit, Prefect flow run, metrics, versions, and the
  sha256 of every file.
The same directory is also written as one reproducible .tar.gz (package.archive).

tasks/modelpackage.py reads packages: every file listed and checked, nothing unlisted, optionally signed
(manifest.sig, an HMAC-SHA256 of manifest.json under TRAINFLOW_SIGNING_KEY).
Before the new package replaces the old one, its predictions on the raw test rows must equal the
evaluate stage's to 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tasks.errors import UserError
from tasks.files import atomic_dir, sha256_file, write_json
from tasks.modelcard import model_card
from tasks.modelpackage import FORMAT_VERSION, SIGNING_ENV, ModelPackage, signature, split_of, verified
from tasks.onnx_export import export
from tasks.settings import Settings, cli, dump_settings
from tasks.training.model import load_model, servable

PARITY_TOL = 1e-5  # in target standard deviations: float32 rounding of a prediction of ~1000 is ~1e-4


def export_onnx(model: torch.nn.Module, meta: dict, path: Path) -> None:
    from tasks.training.factory import example_batch

    wrapped, output = servable(model, meta)
    export(wrapped, example_batch(meta["arch"], 2), path, output)


def write_archive(directory: Path, archive: Path) -> None:
    """directory as a reproducible .tar.gz (sorted names, fixed times and owners), written atomically."""
    import gzip
    import tarfile

    from tasks.files import atomic_path

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    with (
        atomic_path(archive) as tmp,
        open(tmp, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=f"{archive.name.removesuffix('.tar.gz')}/{path.name}", filter=clean)


def _dvc_hashes(s: Settings) -> dict:
    """What DVC recorded for the data and the params in dvc.lock (of the last `dvc repro` / flow commit)."""
    import hashlib

    import yaml

    out = {"params_sha256": hashlib.sha256(json.dumps(dump_settings(s), sort_keys=True).encode()).hexdigest()}
    lock = Path("dvc.lock")
    if lock.exists():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in ("ingest", "validate", "preprocess"):
            outs = stages.get(stage, {}).get("outs", [])
            out.update({f"{stage}:{o['path']}": o.get("md5") for o in outs})
    return out


def _flow_run_id() -> str | None:
    """The Prefect flow run this stage runs in, if any (prefect is not imported otherwise)."""
    import os
    import sys

    if "prefect" in sys.modules:
        from prefect.runtime import flow_run

        if flow_run.id:
            return str(flow_run.id)
    return os.environ.get("PREFECT__FLOW_RUN_ID")


def _git_commit() -> dict:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _version() -> str:
    try:
        return version("trainflow")
    except PackageNotFoundError:  # run from a checkout: the version pyproject.toml declares
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"] if pyproject.exists() else "unknown"


def package(s: Settings) -> dict:
    feat_dir, train_dir, eval_dir = Path(s.preprocess.out_dir), Path(s.train.out_dir), Path(s.evaluate.out_dir)
    for needed in (train_dir / "model.pt", eval_dir / "metrics.json", eval_dir / "predictions.csv"):
        if not needed.exists():
            raise UserError(f"package: {needed} does not exist; run the train and evaluate stages first")
    model, meta = load_model(train_dir / "model.pt")
    with atomic_dir(s.package.out_dir) as stage:
        export_onnx(model, meta, stage / "model.onnx")
        shutil.copyfile(feat_dir / "transform.json", stage / "transform.json")
        shutil.copyfile(train_dir / "model.pt", stage / "model.pt")  # the weights a warm start continues from
        shutil.copyfile(s.dataset.suite, stage / "suite.yaml")
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        gate = json.loads((eval_dir / "gate.json").read_text()) if (eval_dir / "gate.json").exists() else {}
        slices = json.loads((eval_dir / "slices.json").read_text()) if (eval_dir / "slices.json").exists() else {}
        training = json.loads((train_dir / "summary.json").read_text())
        schema = json.loads((feat_dir / "schema.json").read_text())
        manifest = {
            "format_version": FORMAT_VERSION,
            "trainflow_version": _version(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
            "git": _git_commit(),
            "prefect_flow_run_id": _flow_run_id(),
            "data": {
                "dataset": s.dataset.name,
                "source": s.dataset.source,
                "rows": schema["rows"],
                "raw": {"path": s.ingest.out, "sha256": sha256_file(s.ingest.out)},
                "dvc": _dvc_hashes(s),
            },
            "features": meta["features"],
            "target": meta["target"],
            "task": s.dataset.task,
            "modality": s.dataset.modality,
            "target_transform": s.dataset.target_transform,
            "classes": meta.get("classes"),
            "key": list(s.dataset.key),
            "split": split_of(s),
            "params": dump_settings(s),
            "metrics": metrics,
            "training": training,
            "parent": training.get("parent"),  # a warm start's parent (train.init_from): its sha256 and run
        }
        (stage / "MODEL_CARD.md").write_text(model_card(manifest, slices, gate.get("compared") or {}, s))
        manifest["files"] = files = {p.name: sha256_file(p) for p in sorted(stage.iterdir())}  # every file it holds
        write_json(stage / "manifest.json", manifest)
        if os.environ.get(SIGNING_ENV):
            (stage / "manifest.sig").write_text(signature((stage / "manifest.json").read_bytes(), os.environ[SIGNING_ENV]) + "\n")

        gap = check_parity(stage, feat_dir, eval_dir)  # before the new package replaces the previous one
    write_archive(Path(s.package.out_dir), Path(s.package.archive))
    return {"out_dir": s.package.out_dir, "archive": s.package.archive, "parity_max_abs_diff": gap, "files": files}


def check_parity(stage: Path, feat_dir: Path, eval_dir: Path) -> float:
    """The package must reproduce the evaluate stage: predictions within PARITY_TOL of the target's spread
    (the transformed target's: its predictions' spread), probabilities within PARITY_TOL."""
    package = ModelPackage(*verified(stage))
    predicted = package.predict(pd.read_parquet(feat_dir / "test_raw"))
    table = pd.read_csv(eval_dir / "predictions.csv")
    if package.classes:
        expected, scale, unit = table[[f"p_{c}" for c in package.classes]].to_numpy(), 1.0, "probability"
    else:
        expected = table["predicted"].to_numpy()
        transformed = package.transform.get("target_transform", "none") != "none"
        scale = float(np.std(expected)) if transformed and len(expected) else package.transform["target_std"]
        unit = "prediction std" if transformed else "target std"
    gap = float(np.max(np.abs(predicted - expected))) if len(expected) else 0.0
    if predicted.shape != expected.shape or gap > PARITY_TOL * scale:
        raise RuntimeError(
            f"package: predictions differ from evaluate's by {gap:.3g} (> {PARITY_TOL} {unit} = {PARITY_TOL * scale:.3g}); "
            "not published"
        )
    return gap


if __name__ == "__main__":
    cli(package)
