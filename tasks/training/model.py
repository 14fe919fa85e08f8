"""The model family and its checkpoint format (weights + plain metadata, loaded with weights_only=True)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from tasks.errors import UserError


def embedding_dim(cardinality: int) -> int:
    return max(2, min(16, round(1.6 * cardinality**0.56)))  # fast.ai's rule of thumb, capped


class PiecewiseLinear(nn.Module):
    """Piecewise-linear encoding (Gorishniy et al. 2022, "On Embeddings for Numerical Features in Tabular Deep
    Learning"): with bin edges b_0 < ... < b_T at train quantiles, bin t of x encodes as (x - b_{t-1}) / (b_t - b_{t-1})
    clipped to [0, 1] (the first bin unbounded below, the last above): a column's value becomes how far it has
    got through each bin. The edges are a buffer (saved with the weights, constants in the ONNX graph), set once
    from the training rows by `fit`; a bin of zero width (a repeated quantile) encodes as a step at its edge, the
    first and last bins too: unbounded, a zero-width end bin would scale a value outside the train range (a later
    month of appended rows) by 1e9."""

    edges: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor

    def __init__(self, columns: int, bins: int):
        super().__init__()
        self.register_buffer("edges", torch.linspace(-3, 3, bins + 1).repeat(columns, 1))  # (columns, bins + 1)
        low, high = torch.zeros(bins), torch.ones(bins)
        low[0], high[-1] = -math.inf, math.inf
        self.register_buffer("low", low, persistent=False)
        self.register_buffer("high", high, persistent=False)

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Edges at the quantiles of x's columns: order statistics of the rows, the same on every rank and run."""
        ranked = x.sort(dim=0).values
        at = (torch.linspace(0, 1, self.edges.shape[1]) * (len(x) - 1)).round().long().to(x.device)
        self.edges.copy_(ranked[at].T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, columns) -> (n, columns, bins)
        left, span = self.edges[:, :-1], self.edges[:, 1:] - self.edges[:, :-1]
        width, step = span.clamp_min(1e-9), span <= 0
        low, high = torch.where(step, 0.0, self.low), torch.where(step, 1.0, self.high)  # a step is bounded at both ends
        return torch.clamp((x.unsqueeze(-1) - left) / width, low, high)


class Periodic(nn.Module):
    """Periodic encoding (the same paper's "PLR"): cos and sin of 2π·c·x for `frequencies` trained coefficients c
    per column, initialised from N(0, SIGMA²)."""

    SIGMA = 0.1  # the scale of the initial frequencies, for features scaled to unit variance

    def __init__(self, columns: int, frequencies: int):
        super().__init__()
        self.coefficients = nn.Parameter(torch.randn(columns, frequencies) * self.SIGMA)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, columns) -> (n, columns, 2 * frequencies)
        v = 2 * math.pi * self.coefficients * x.unsqueeze(-1)
        return torch.cat([torch.cos(v), torch.sin(v)], dim=-1)


class NumericEmbedding(nn.Module):
    """Each numeric column encoded (piecewise_linear or periodic), then through a linear layer of its own to
    `dim` values and a ReLU: (n, columns) -> (n, columns × dim)."""

    def __init__(self, kind: str, columns: int, bins: int, dim: int):
        super().__init__()
        self.encode = PiecewiseLinear(columns, bins) if kind == "piecewise_linear" else Periodic(columns, bins)
        width = bins if kind == "piecewise_linear" else 2 * bins
        bound = width**-0.5  # nn.Linear's initialisation, per column
        self.weight = nn.Parameter(torch.empty(columns, width, dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(columns, dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.einsum("ncw,cwd->ncd", self.encode(x), self.weight) + self.bias
        return torch.relu(e).flatten(1)


class Embedder(nn.Module):
    """The model input: one float matrix (the transform's features) in which categorical columns hold codes
    (0 = out of vocabulary). Numeric columns pass as they are, or through a `NumericEmbedding`
    (numeric = {"kind", "bins", "dim"}); each code column becomes its embedding."""

    cat_index: torch.Tensor  # buffers: the positions of the code columns and of the numeric ones
    num_index: torch.Tensor

    def __init__(self, n_features: int, categorical: list[dict] | None = None, numeric: dict | None = None):
        super().__init__()
        categorical = categorical or []
        cat_index = [c["index"] for c in categorical]
        num_index = [i for i in range(n_features) if i not in cat_index]
        self.register_buffer("cat_index", torch.tensor(cat_index, dtype=torch.long), persistent=False)
        self.register_buffer("num_index", torch.tensor(num_index, dtype=torch.long), persistent=False)
        self.numeric = NumericEmbedding(numeric["kind"], len(num_index), numeric["bins"], numeric["dim"]) if numeric else None
        self.embeddings = nn.ModuleList(nn.Embedding(c["cardinality"], embedding_dim(c["cardinality"])) for c in categorical)
        n_num = len(num_index) * (numeric["dim"] if numeric else 1)
        self.out_features = n_num + sum(embedding_dim(c["cardinality"]) for c in categorical)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not len(self.embeddings) and self.numeric is None:
            return x
        numeric = x.index_select(1, self.num_index)
        if self.numeric is not None:
            numeric = self.numeric(numeric)
        if not len(self.embeddings):
            return numeric
        codes = x.index_select(1, self.cat_index).long()
        return torch.cat([numeric] + [e(codes[:, i]) for i, e in enumerate(self.embeddings)], dim=1)


class MLP(nn.Module):
    """Feed-forward network: [Linear -> SiLU -> Dropout] per hidden layer, then a linear head with one output
    (a number, or a binary logit) or one per class."""

    def __init__(
        self,
        n_features: int,
        hidden: list[int],
        dropout: float = 0.0,
        categorical: list[dict] | None = None,
        outputs: int = 1,
        numeric: dict | None = None,
    ):
        super().__init__()
        self.inputs = Embedder(n_features, categorical, numeric)
        layers, width = [], self.inputs.out_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.SiLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = h
        layers.append(nn.Linear(width, outputs))
        self.net = nn.Sequential(*layers)
        self.squeeze = outputs == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(self.inputs(x))
        return out.squeeze(-1) if self.squeeze else out


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p else nn.Identity()  # same layer positions (state_dict keys) either way, no kernel at 0


class ResMLP(nn.Module):
    """Residual MLP (Gorishniy et al. 2021, "ResNet" for tabular data): the inputs projected to width
    hidden[0], then one block per entry of hidden, x + Dropout(Linear(Dropout(SiLU(Linear(LayerNorm(x)))))) with
    inner width h, then LayerNorm, SiLU and a linear head."""

    def __init__(
        self,
        n_features: int,
        hidden: list[int],
        dropout: float = 0.0,
        categorical: list[dict] | None = None,
        outputs: int = 1,
        numeric: dict | None = None,
    ):
        super().__init__()
        self.inputs = Embedder(n_features, categorical, numeric)
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
        self.head = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, outputs))
        self.squeeze = outputs == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(self.inputs(x))
        for block in self.blocks:
            x = x + block(x)
        out = self.head(x)
        return out.squeeze(-1) if self.squeeze else out


MODELS = {"mlp": MLP, "resmlp": ResMLP}


def outputs_of(schema: dict) -> int:
    """One output for a number or a binary label (its logit), one per class for multiclass."""
    classes = schema.get("classes") or []
    return len(classes) if len(classes) > 2 else 1


def architecture(cfg, schema: dict, outputs: int | None = None) -> dict:
    """What the model file records of the model: enough to build it again (train settings + feature metadata;
    for a factory of your own, the train settings it is called with)."""
    if schema.get("modality") == "image":  # the cnn and resnet families (tasks/training/cnn.py)
        from tasks.training.cnn import image_architecture

        return image_architecture(cfg, schema, outputs or outputs_of(schema))
    arch = {
        "model": cfg.model,
        "n_features": len(schema["features"]),
        "hidden": list(cfg.hidden),
        "dropout": cfg.dropout,
        "categorical": schema.get("categorical", []),
        "outputs": outputs or outputs_of(schema),
    }
    if cfg.numeric_embedding != "none":  # (absent otherwise: the records of models from before stay the same)
        arch["numeric"] = {"kind": cfg.numeric_embedding, "bins": cfg.embedding_bins, "dim": cfg.embedding_dim}
    if cfg.model not in MODELS:
        arch |= {"task": schema.get("task", "regression"), "classes": schema.get("classes"), "features": schema["features"]}
        arch["train"] = cfg.model_dump()
    return arch


def build_model(arch: dict) -> nn.Module:
    """The network an architecture record describes: a built-in model, or `package.module:factory`'s."""
    name = arch.get("model", "mlp")
    if "image" in arch:
        from tasks.training.cnn import build_image_model

        return build_image_model(arch)
    if name not in MODELS:
        from tasks.training.factory import from_factory

        return from_factory(arch)
    return MODELS[name](
        arch["n_features"],
        list(arch["hidden"]),
        arch["dropout"],
        arch.get("categorical"),
        arch.get("outputs", 1),
        arch.get("numeric"),
    )


def fit_inputs(model: nn.Module, x: torch.Tensor) -> None:
    """What a model's inputs learn from the training rows before training: the bin edges of a piecewise-linear
    encoding (from the whole train split, which every rank holds: the same edges on every rank)."""
    inputs = getattr(model, "inputs", None)
    if isinstance(inputs, Embedder) and inputs.numeric is not None and isinstance(inputs.numeric.encode, PiecewiseLinear):
        inputs.numeric.encode.fit(x.index_select(1, inputs.num_index))


class Denormalized(nn.Module):
    """Model inputs -> predictions in target units (the standardisation, then the target transform, undone)."""

    def __init__(self, model: nn.Module, mean: float, std: float, target_transform: str = "none"):
        super().__init__()
        self.model, self.mean, self.std, self.inverse = model, mean, std, target_transform

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        y = self.model(features) * self.std + self.mean
        return torch.exp(y) if self.inverse == "log" else torch.expm1(y) if self.inverse == "log1p" else y


class Probabilities(nn.Module):
    """Model inputs -> one probability per class (n, K): the sigmoid of a binary logit, or the softmax."""

    def __init__(self, model: nn.Module, binary: bool):
        super().__init__()
        self.model, self.binary = model, binary

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.model(features)
        if self.binary:
            p = torch.sigmoid(logits.float())
            return torch.stack([1 - p, p], dim=-1)
        return torch.softmax(logits.float(), dim=-1)


def servable(model: nn.Module, meta: dict) -> tuple[nn.Module, str]:
    """The trained network with what serving needs around it, and its output's name."""
    if meta.get("task", "regression") == "regression":
        wrapped = Denormalized(model, meta["target_mean"], meta["target_std"], meta.get("target_transform") or "none")
        return wrapped.eval(), "prediction"
    return Probabilities(model, len(meta["classes"]) == 2).eval(), "probabilities"


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
    elif isinstance(model, MLP):
        units = [model.get_submodule("inputs")] + [m for m in model.get_submodule("net").children() if isinstance(m, nn.Linear)]
    else:  # a model of your own: its direct children (a `shard_units()` method of the model chooses instead)
        chosen = getattr(model, "shard_units", None)
        units = list(chosen()) if callable(chosen) else list(model.children())
    return [u for u in units if any(True for _ in u.parameters())]
