"""The model family and its checkpoint format (weights + plain metadata, loaded with weights_only=True)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tasks.settings import UserError


class MLP(nn.Module):
    """Feed-forward regressor: [Linear -> SiLU -> Dropout] per hidden layer, then a linear head."""

    def __init__(self, n_features: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        layers, width = [], n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.SiLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def build_model(arch: dict) -> MLP:
    return MLP(arch["n_features"], list(arch["hidden"]), arch["dropout"])


def load_model(path: str | Path) -> tuple[MLP, dict]:
    """Load a model file written by the train stage; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; run the train stage first (python -m tasks.train)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled classes; a truncated file fails to unzip
        raise UserError(f"{path} is not a Trainflow model file (or is corrupt): {e}") from None
    if not isinstance(ckpt, dict) or not {"arch", "model", "target_mean", "target_std"} <= set(ckpt):
        raise UserError(f"{path} is not a Trainflow model file: expected keys arch, model, target_mean, target_std")
    model = build_model(ckpt["arch"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt
