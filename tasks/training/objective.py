"""What training minimises and how validation is judged, per task: the loss, the target's preparation, the metric.

Losses are sums over a rank's rows (the loop scales them so ranks' gradients average to the global batch's
mean); validation sums what the epoch's record needs (the loss, and for classification the rows predicted
right), all-reduced once per epoch, and `record` turns them into the figures a person reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TRANSFORMS = {"none": lambda y: y, "log": torch.log, "log1p": torch.log1p}


class Regression:
    """A number: squared error on the standardised (and maybe log-transformed) target; validation RMSE in the
    units the model is trained in (the transformed ones with dataset.target_transform)."""

    metric = "val_rmse"
    outputs = 1

    def __init__(self, transform: dict, class_weights: str = "none"):
        self.mean, self.std = transform["target_mean"], transform["target_std"]
        self.forward = TRANSFORMS[transform.get("target_transform", "none")]

    def prepare(self, y: torch.Tensor) -> torch.Tensor:
        return (self.forward(y.double()).float() - self.mean) / self.std

    def loss_sum(self, predicted: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (predicted.float() - y).pow(2).sum()

    def val_sums(self, predicted: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_sum(predicted, y).reshape(1)

    def record(self, train_sum: float, val_sums: list[float], n_train: int, n_val: int) -> dict:
        train_loss, val_loss = train_sum / n_train, val_sums[0] / n_val
        return {"train_loss": train_loss, "val_loss": val_loss, "val_rmse": math.sqrt(val_loss) * self.std}


class Classification:
    """A label: binary cross-entropy on one logit (binary) or cross-entropy on one logit per class
    (multiclass), optionally weighted per class; validation log-loss (unweighted) and accuracy."""

    metric = "val_accuracy"

    def __init__(self, transform: dict, class_weights: str = "none", class_rows: list[int] | None = None):
        self.classes = transform["classes"]
        self.binary = len(self.classes) == 2
        self.outputs = 1 if self.binary else len(self.classes)
        self.mean, self.std = 0.0, 1.0
        self.weights: torch.Tensor | None = None
        if class_weights == "balanced":
            rows = torch.tensor(class_rows, dtype=torch.float64)
            self.weights = (rows.sum() / (len(rows) * rows.clamp(min=1))).float()

    def prepare(self, y: torch.Tensor) -> torch.Tensor:
        return y.long()

    def _losses(self, predicted: torch.Tensor, y: torch.Tensor, weighted: bool) -> torch.Tensor:
        w = self.weights.to(predicted.device)[y] if weighted and self.weights is not None else None
        if self.binary:
            return F.binary_cross_entropy_with_logits(predicted.float(), y.float(), weight=w, reduction="sum")
        losses = F.cross_entropy(predicted.float(), y, reduction="none")
        return (losses * w).sum() if w is not None else losses.sum()

    def loss_sum(self, predicted: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._losses(predicted, y, weighted=True)

    def val_sums(self, predicted: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        label = (predicted > 0).long() if self.binary else predicted.argmax(-1)
        return torch.stack([self._losses(predicted, y, weighted=False), (label == y).sum().float()])

    def record(self, train_sum: float, val_sums: list[float], n_train: int, n_val: int) -> dict:
        return {"train_loss": train_sum / n_train, "val_loss": val_sums[0] / n_val, "val_accuracy": val_sums[1] / n_val}


def objective_for(transform: dict, class_weights: str = "none", class_rows: list[int] | None = None):
    """The objective of the features' task."""
    if transform.get("task", "regression") == "regression":
        return Regression(transform)
    return Classification(transform, class_weights, class_rows)
