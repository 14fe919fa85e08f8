"""An example of a model of your own (`train.model: "tasks.training.ft_transformer:build"`): an FT-Transformer
(Gorishniy et al., "Revisiting Deep Learning Models for Tabular Data", NeurIPS 2021), small.

Every feature becomes a token: a numeric feature x_j as x_j * w_j + b_j, a categorical code as its embedding;
a [CLS] token is prepended; pre-norm transformer blocks mix the tokens; the head reads the [CLS] token.
train.hidden gives the token width (hidden[0]) and the number of blocks (len(hidden)); train.dropout the
attention and feed-forward dropout. It follows the factory contract of tasks/training/factory.py: built from
(schema, settings), it returns (batch,) for one output and (batch, classes) otherwise, and exports to ONNX.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEADS = 8


class Tokenizer(nn.Module):
    cat_index: torch.Tensor  # buffers: the positions of the code columns and of the numeric ones
    num_index: torch.Tensor

    def __init__(self, n_features: int, categorical: list[dict], width: int):
        super().__init__()
        cat_index = [c["index"] for c in categorical]
        self.register_buffer("cat_index", torch.tensor(cat_index, dtype=torch.long), persistent=False)
        num = [i for i in range(n_features) if i not in cat_index]
        self.register_buffer("num_index", torch.tensor(num, dtype=torch.long), persistent=False)
        self.weight = nn.Parameter(torch.randn(len(num), width) / width**0.5)
        self.bias = nn.Parameter(torch.zeros(len(num), width))
        self.embeddings = nn.ModuleList(nn.Embedding(c["cardinality"], width) for c in categorical)
        self.cls = nn.Parameter(torch.randn(1, 1, width) / width**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = [x.index_select(1, self.num_index).unsqueeze(-1) * self.weight + self.bias]
        if len(self.embeddings):
            codes = x.index_select(1, self.cat_index).long()
            tokens += [torch.stack([e(codes[:, i]) for i, e in enumerate(self.embeddings)], dim=1)]
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), *tokens], dim=1)


class Block(nn.Module):
    """Pre-norm multi-head self-attention, then a feed-forward layer (SiLU), each residual."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.heads = HEADS if width % HEADS == 0 else 1
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        # no bias on q, k, v: a key bias has no gradient (softmax ignores it), and Adam would turn rounding noise into steps
        self.qkv, self.out = nn.Linear(width, 3 * width, bias=False), nn.Linear(width, width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Dropout(dropout), nn.Linear(2 * width, width))
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.out(attended.transpose(1, 2).reshape(b, t, w))
        return x + self.ff(self.norm2(x))


class FTTransformer(nn.Module):
    def __init__(self, n_features: int, categorical: list[dict], width: int, blocks: int, dropout: float, outputs: int):
        super().__init__()
        self.tokens = Tokenizer(n_features, categorical, width)
        self.blocks = nn.ModuleList(Block(width, dropout) for _ in range(blocks))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, outputs))
        self.squeeze = outputs == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x)
        for block in self.blocks:
            h = block(h)
        out = self.head(h[:, 0])
        return out.squeeze(-1) if self.squeeze else out

    def shard_units(self) -> list[nn.Module]:
        """FSDP: the tokenizer, each block, the head."""
        return [self.tokens, *self.blocks, self.head]


def build(schema: dict, settings) -> nn.Module:
    """The factory: width hidden[0], len(hidden) blocks (the trainer has seeded torch with train.seed)."""
    return FTTransformer(
        schema["n_features"], schema["categorical"], settings.hidden[0], len(settings.hidden), settings.dropout, schema["outputs"]
    )
