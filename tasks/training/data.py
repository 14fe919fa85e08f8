"""The features as training sees them: whole splits as tensors on the device, checked against their metadata.

Batches are index slices of those tensors (per-sample DataLoaders cost ~3x here); every rank draws the same
permutation and takes its own contiguous slice of each global batch (`rank_slice`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from tasks.errors import UserError

EVAL_CHUNK = 65536  # rows scored at once (bounded memory on any device)


def load_split(directory: Path, features: list[str], target: str) -> tuple[torch.Tensor, torch.Tensor]:
    names = set(
        pq.read_schema(
            next(iter(sorted(Path(directory).glob("*.parquet"))), directory) if Path(directory).is_dir() else directory
        ).names
    )
    missing = [c for c in features + [target] if c not in names]
    if missing:
        raise UserError(
            f"{directory} lacks the columns {missing} that the model expects: the features and the model "
            "come from different runs; rerun the preprocess and train stages (dvc repro)"
        )
    table = pq.read_table(directory, columns=features + [target])
    x = np.stack([table.column(c).to_numpy() for c in features], axis=1).astype(np.float32)
    y = table.column(target).to_numpy().astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def check_features(schema: dict, x: torch.Tensor) -> None:
    """The model built from the feature metadata must fit the features: every categorical column's codes must
    index its embedding table (an out-of-range code is a cryptic device-side assert on GPU)."""
    for c in schema.get("categorical", []):
        if not 0 <= c["index"] < x.shape[1]:
            raise UserError(
                f"schema.json gives categorical column {c.get('name')!r} index {c['index']}, but the features "
                f"have {x.shape[1]} columns; rerun the preprocess stage"
            )
        codes = x[:, c["index"]]
        top = float(codes.max()) if len(codes) else 0.0
        if top >= c["cardinality"] or float(codes.min()) < 0 or not torch.equal(codes, codes.round()):
            raise UserError(
                f"feature {c.get('name')!r} holds code {top:g}, but schema.json gives it {c['cardinality']} "
                "categories (codes 0..cardinality-1): the features and their metadata disagree; rerun the "
                "preprocess stage"
            )


@dataclass
class Features:
    """The train and validation splits on the device, targets prepared for the loss, and their metadata."""

    schema: dict
    transform: dict
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def n_val(self) -> int:
        return len(self.x_val)

    # what the loop asks of its data (an image loader streams instead: tasks/images/loader.py)
    def start_epoch(self, perm: torch.Tensor, epoch: int, skip: int) -> None:
        """Nothing to read ahead: batches are slices of tensors already on the device."""

    def train_batch(self, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_train[part], self.y_train[part]

    def val_batches(self, rank: int, world: int):
        """This rank's shard of the validation split, in the same number of chunks on every rank."""
        x, y = self.x_val, self.y_val
        shard = torch.arange(rank, len(x), world, device=x.device)
        chunks = max(1, math.ceil(math.ceil(len(x) / world) / EVAL_CHUNK))
        for c in shard.tensor_split(chunks):
            yield x[c], y[c]

    def close(self) -> None:
        pass


def load_features(feat_dir: Path, device: torch.device, objective) -> Features:
    """Both splits read once and copied to the device once (pinned, non-blocking on CUDA)."""
    schema = json.loads((feat_dir / "schema.json").read_text())
    transform = json.loads((feat_dir / "transform.json").read_text())
    x_train, y_train = load_split(feat_dir / "train", schema["features"], schema["target"])
    x_val, y_val = load_split(feat_dir / "val", schema["features"], schema["target"])
    check_features(schema, x_train)
    tensors = [x_train, objective.prepare(y_train), x_val, objective.prepare(y_val)]
    if device.type == "cuda":
        tensors = [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    return Features(schema, transform, *tensors)


def rank_slice(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank r's part of a global batch: contiguous, sizes differing by at most one, together the whole batch."""
    m = len(batch)
    return batch[rank * m // world : (rank + 1) * m // world]


def check_inputs(s) -> dict:
    """The stage's checks before any rank starts: features there, batch sizes that fit, a model that fits."""
    cfg, feat_dir = s.train, Path(s.preprocess.out_dir)
    if not (feat_dir / "schema.json").exists():
        raise UserError(f"train: no features in {feat_dir}; run the preprocess stage first")
    schema = json.loads((feat_dir / "schema.json").read_text())
    n_train = schema["rows"]["train"]
    if cfg.batch_size > n_train:
        raise UserError(f"train.batch_size={cfg.batch_size} exceeds the {n_train:,} training rows; lower train.batch_size")
    check_model_fits(cfg, schema)
    if cfg.init_from:  # the parent verified and of this data, before any rank starts
        from tasks.parent import check_features

        check_features(s, json.loads((feat_dir / "transform.json").read_text()))
    if cfg.model not in ("mlp", "resmlp", "cnn", "resnet"):  # a factory of your own: its contract, before any rank starts
        import tempfile

        from tasks.training.factory import check_factory
        from tasks.training.model import architecture

        with tempfile.TemporaryDirectory(prefix="trainflow-export-check-") as tmp:
            check_factory(architecture(cfg, schema), export_to=Path(tmp) / "model.onnx")
    if cfg.batch_size < cfg.world_size * cfg.grad_accum_steps:
        raise UserError(
            f"train.batch_size={cfg.batch_size} gives each of the {cfg.world_size} ranks fewer rows per step than "
            f"train.grad_accum_steps={cfg.grad_accum_steps} micro-batches; raise train.batch_size or lower "
            "train.grad_accum_steps"
        )
    return schema


def check_model_fits(cfg, schema: dict) -> None:
    """Refuse a model whose training state cannot fit this machine (before any rank starts), rather than a
    crash deep in a rank. The state is ~6 copies of the weights: weights, gradients, AdamW's two moments, the
    best model kept for early stopping and a checkpoint snapshot; every local rank holds it (FSDP: a share)."""
    from tasks.training.model import architecture, build_model

    if cfg.launcher != "local":
        return  # the ranks run on other machines (dask) or were sized by whoever started torchrun
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(architecture(cfg, schema)).parameters())
    need = 6 * 4 * n * (1 if cfg.strategy == "fsdp" else cfg.world_size)
    if torch.cuda.is_available():
        have, where = torch.cuda.get_device_properties(0).total_memory, "GPU memory per device"
        need //= cfg.world_size
    else:
        import psutil  # a dependency of DVC

        have, where = psutil.virtual_memory().available, "memory available here"
    if need > have:
        raise UserError(
            f"train.hidden={list(cfg.hidden)} makes a {cfg.model} of {n:,} parameters, about {need / 2**30:,.1f} GiB "
            f"to train ({cfg.world_size} rank(s): weights, gradients, AdamW state, copies), more than the "
            f"{have / 2**30:,.1f} GiB of {where}; lower train.hidden"
        )
