"""Build the self-contained model package.  Run: python -m tasks.package

The package directory holds:
- model.onnx: the network with target de-standardisation built in. ONNX because it is portable (runs
  with onnxruntime in any language, no torch or Python needed at serving time), it holds no pickled code,
  and onnxruntime reproduces torch within ~1e-7. Exported with the torch.export-based exporter (dynamo).
- transform.json: the feature transform fitted by preprocess (the same file, the same apply code).
- suite.yaml: the expectation suite the training data passed.
- manifest.json: params, data hashes, git commit, metrics, versions, and the sha256 of every file.

`load_package` verifies every sha256 before it returns a predictor; a tampered package is refused.
Before the new package replaces the old one, its predictions on the raw test rows must equal the
evaluate stage's to 1e-5.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import warnings
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tasks.files import atomic_dir, sha256_file, write_json
from tasks.model import load_model
from tasks.features import apply_transform
from tasks.settings import Settings, UserError, cli, dump_settings

FORMAT_VERSION = 2  # 2: transform v2 (categoricals, datetimes, imputation)
PARITY_TOL = 1e-5  # in target standard deviations: float32 rounding of a prediction of ~1000 is ~1e-4


class Denormalized(torch.nn.Module):
    """Model inputs -> predictions in target units."""

    def __init__(self, model: torch.nn.Module, mean: float, std: float):
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features) * self.std + self.mean


def export_onnx(model: torch.nn.Module, meta: dict, path: Path) -> None:
    wrapped = Denormalized(model, meta["target_mean"], meta["target_std"]).eval()
    example = torch.zeros(2, meta["arch"]["n_features"])
    # the exporter warns about torchvision ops and torch-internal deprecations that do not concern us
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            wrapped, (example,), str(path), dynamo=True, external_data=False, verbose=False,
            input_names=["features"], output_names=["prediction"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )


class ModelPackage:
    """A verified package: `predict(frame)` maps raw feature columns to predictions."""

    def __init__(self, directory: Path, manifest: dict):
        import onnxruntime as ort

        self.directory, self.manifest = directory, manifest
        self.transform = json.loads((directory / "transform.json").read_text())
        self.session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self.transform["inputs"] if c not in frame.columns]
        if missing:
            raise UserError(f"predict: input lacks columns {missing} that the model needs")
        x = apply_transform(self.transform, frame)
        if not len(x):
            return np.empty(0)
        return np.concatenate([self.session.run(None, {"features": c})[0] for c in np.array_split(x, -(-len(x) // 65536))])


def load_package(directory: str | Path) -> ModelPackage:
    directory = Path(directory)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise UserError(f"{directory}: not a Trainflow package (manifest.json unreadable: {e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{directory}: package format {manifest.get('format_version')} is not supported "
                        f"(this Trainflow reads format {FORMAT_VERSION}); rebuild it with this version")
    for name, digest in manifest["files"].items():
        path = directory / name
        if not path.exists():
            raise UserError(f"{directory}: {name} is missing; the package is incomplete, rebuild or re-download it")
        if sha256_file(path) != digest:
            raise UserError(f"{directory}: {name} does not match its sha256 in manifest.json; the package was altered")
    return ModelPackage(directory, manifest)


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
    except PackageNotFoundError:
        return "unknown"


def package(s: Settings) -> dict:
    feat_dir, train_dir, eval_dir = Path(s.preprocess.out_dir), Path(s.train.out_dir), Path(s.evaluate.out_dir)
    for needed in (train_dir / "model.pt", eval_dir / "metrics.json", eval_dir / "predictions.csv"):
        if not needed.exists():
            raise UserError(f"package: {needed} does not exist; run the train and evaluate stages first")
    model, meta = load_model(train_dir / "model.pt")
    with atomic_dir(s.package.out_dir) as stage:
        export_onnx(model, meta, stage / "model.onnx")
        shutil.copyfile(feat_dir / "transform.json", stage / "transform.json")
        shutil.copyfile(s.dataset.suite, stage / "suite.yaml")
        files = {name: sha256_file(stage / name) for name in ("model.onnx", "transform.json", "suite.yaml")}
        manifest = {
            "format_version": FORMAT_VERSION,
            "trainflow_version": _version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
            "git": _git_commit(),
            "data": {"dataset": s.dataset.name, "source": s.dataset.source, "raw": {"path": s.ingest.out, "sha256": sha256_file(s.ingest.out)}},
            "features": meta["features"],
            "target": meta["target"],
            "params": dump_settings(s),
            "metrics": json.loads((eval_dir / "metrics.json").read_text()),
            "training": json.loads((train_dir / "summary.json").read_text()),
            "files": files,
        }
        write_json(stage / "manifest.json", manifest)

        # the package must reproduce the evaluate stage before it replaces the previous one
        predicted = load_package(stage).predict(pd.read_parquet(feat_dir / "test_raw"))
        expected = pd.read_csv(eval_dir / "predictions.csv")["predicted"].to_numpy()
        gap = float(np.max(np.abs(predicted - expected))) if len(expected) else 0.0
        scale = json.loads((feat_dir / "transform.json").read_text())["target_std"]
        if predicted.shape != expected.shape or gap > PARITY_TOL * scale:
            raise RuntimeError(f"package: predictions differ from evaluate's by {gap:.3g} "
                               f"(> {PARITY_TOL} target std = {PARITY_TOL * scale:.3g}); not published")
    return {"out_dir": s.package.out_dir, "parity_max_abs_diff": gap, "files": files}


if __name__ == "__main__":
    cli(package)
