"""The model family and its checkpoint format (weights + plain metadata, loaded with weights_only=True)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tasks.settings import UserError


def embedding_dim(cardinality: int) -> int:
    return max(2, min(16, round(1.6 * cardinality ** 0.56)))  # fast.ai's rule of thumb, capped


class MLP(nn.Module):
    """Feed-forward regressor: [Linear -> SiLU -> Dropout] per hidden layer, then a linear head.

    Inputs are one float matrix (the transform's features). Categorical columns hold codes (0 = out of
    vocabulary); each goes through its own embedding, concatenated with the other columns."""

    def __init__(self, n_features: int, hidden: list[int], dropout: float = 0.0, categorical: list[dict] | None = None):
        super().__init__()
        categorical = categorical or []
        cat_index = [c["index"] for c in categorical]
        self.register_buffer("cat_index", torch.tensor(cat_index, dtype=torch.long), persistent=False)
        self.register_buffer("num_index", torch.tensor([i for i in range(n_features) if i not in cat_index], dtype=torch.long),
                             persistent=False)
        self.embeddings = nn.ModuleList(nn.Embedding(c["cardinality"], embedding_dim(c["cardinality"])) for c in categorical)
        layers, width = [], n_features - len(categorical) + sum(e.embedding_dim for e in self.embeddings)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.SiLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.embeddings):
            codes = x.index_select(1, self.cat_index).long()
            x = torch.cat([x.index_select(1, self.num_index)] + [e(codes[:, i]) for i, e in enumerate(self.embeddings)], dim=1)
        return self.net(x).squeeze(-1)


def build_model(arch: dict) -> MLP:
    return MLP(arch["n_features"], list(arch["hidden"]), arch["dropout"], arch.get("categorical"))


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
