"""What training minimises and how validation is judged, per task: the loss, the target's scaling, the metric.

Losses are sums over a rank's rows (the loop scales them so ranks' gradients average to the global batch's
mean); the epoch's record turns the all-reduced sums into the figures a person reads.
"""

from __future__ import annotations

import math

import torch


class Regression:
    """A number: squared error on the standardised target; validation RMSE in the target's units."""

    metric = "val_rmse"

    def __init__(self, transform: dict):
        self.mean, self.std = transform["target_mean"], transform["target_std"]

    def prepare(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.mean) / self.std

    def loss_sum(self, predicted: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (predicted.float() - y).pow(2).sum()

    def record(self, train_sum: float, val_sum: float, n_train: int, n_val: int) -> dict:
        train_loss, val_loss = train_sum / n_train, val_sum / n_val
        return {"train_loss": train_loss, "val_loss": val_loss, "val_rmse": math.sqrt(val_loss) * self.std}
