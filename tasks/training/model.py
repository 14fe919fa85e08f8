"""The model family and its checkpoint format (weights + plain metadata, loaded with weights_only=True)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tasks.errors import UserError


def embedding_dim(cardinality: int) -> int:
    return max(2, min(16, round(1.6 * cardinality**0.56)))  # fast.ai's rule of thumb, capped


class Embedder(nn.Module):
    """The model input: one float matrix (the transform's features) in which categorical columns hold codes
    (0 = out of vocabulary). Numeric columns pass as they are; each code column becomes its embedding."""

    cat_index: torch.Tensor  # buffers: the positions of the code columns and of the numeric ones
    num_index: torch.Tensor

    def __init__(self, n_features: int, categorical: list[dict] | None = None):
        super().__init__()
        categorical = categorical or []
        cat_index = [c["index"] for c in categorical]
        self.register_buffer("cat_index", torch.tensor(cat_index, dtype=torch.long), persistent=False)
        self.register_buffer(
            "num_index", torch.tensor([i for i in range(n_features) if i not in cat_index], dtype=torch.long), persistent=False
        )
        self.embeddings = nn.ModuleList(nn.Embedding(c["cardinality"], embedding_dim(c["cardinality"])) for c in categorical)
        self.out_features = n_features - len(categorical) + sum(embedding_dim(c["cardinality"]) for c in categorical)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not len(self.embeddings):
            return x
        codes = x.index_select(1, self.cat_index).long()
        return torch.cat([x.index_select(1, self.num_index)] + [e(codes[:, i]) for i, e in enumerate(self.embeddings)], dim=1)


class MLP(nn.Module):
    """Feed-forward regressor: [Linear -> SiLU -> Dropout] per hidden layer, then a linear head."""

    def __init__(self, n_features: int, hidden: list[int], dropout: float = 0.0, categorical: list[dict] | None = None):
        super().__init__()
        self.inputs = Embedder(n_features, categorical)
        layers, width = [], self.inputs.out_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.SiLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.inputs(x)).squeeze(-1)


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p else nn.Identity()  # same layer positions (state_dict keys) either way, no kernel at 0


class ResMLP(nn.Module):
    """Residual MLP (Gorishniy et al. 2021, "ResNet" for tabular data): the inputs projected to width
    hidden[0], then one block per entry of hidden, x + Dropout(Linear(Dropout(SiLU(Linear(LayerNorm(x)))))) with
    inner width h, then LayerNorm, SiLU and a linear head."""

    def __init__(self, n_features: int, hidden: list[int], dropout: float = 0.0, categorical: list[dict] | None = None):
        super().__init__()
        self.inputs = Embedder(n_features, categorical)
        width = hidden[0]
        self.project = nn.Linear(self.inputs.out_features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, h),
                nn.SiLU(),
                _dropout(dropout),
                nn.Linear(h, width),
                _dropout(dropout),
            )
            for h in hidden
        )
        self.head = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(self.inputs(x))
        for block in self.blocks:
            x = x + block(x)
        return self.head(x).squeeze(-1)


MODELS = {"mlp": MLP, "resmlp": ResMLP}


def architecture(cfg, schema: dict) -> dict:
    """What the model file records of the model: enough to build it again (train settings + feature metadata)."""
    return {
        "model": cfg.model,
        "n_features": len(schema["features"]),
        "hidden": list(cfg.hidden),
        "dropout": cfg.dropout,
        "categorical": schema.get("categorical", []),
    }


def build_model(arch: dict) -> nn.Module:
    return MODELS[arch.get("model", "mlp")](arch["n_features"], list(arch["hidden"]), arch["dropout"], arch.get("categorical"))


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
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


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules FSDP shards on their own (each gathered just before it runs, freed after): the
    categorical embeddings, each layer or residual block, the head. The root holds whatever is left."""
    units: list[nn.Module]
    if isinstance(model, ResMLP):
        units = [model.inputs, model.project, *model.blocks, model.head]
    else:
        units = [model.get_submodule("inputs")] + [m for m in model.get_submodule("net").children() if isinstance(m, nn.Linear)]
    return [u for u in units if any(True for _ in u.parameters())]
