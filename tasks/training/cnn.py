"""The image model families (train.model cnn | resnet), and the input every image model starts with.

An image model takes uint8 (or float) pixels (N, C, H, W) in 0..255 and normalises them itself with the
per-channel mean and std preprocess fitted on the train split (`Normalize`, buffers built from the model's
architecture record), so the training loop, evaluation and the ONNX package feed it the same raw pixels.
- cnn: per entry of train.hidden a block of 3×3 conv (that many channels), ReLU and 2×2 max-pool; then the
  feature map (average-pooled to at most 7×7) into a 128-unit dense layer with ReLU, and the head. [32, 64]
  is the classic 2-conv network of Fashion-MNIST's benchmarks (~0.92 test accuracy).
- resnet: a 3×3 stem, then per entry a residual block (two 3×3 convs, group norm, ReLU) of that many channels;
  a block wider than the one before halves the resolution; global average pooling and the head.
  Group norm, not batch norm: a rank's result does not depend on how a batch is split across ranks.
No batch statistics anywhere: 2 ranks train exactly as 1 process on the same global batches.
"""

from __future__ import annotations

import torch
from torch import nn

DENSE = 128  # the cnn's dense layer
MAX_POOLED = 7  # the cnn's feature map is average-pooled to at most this size before the dense layer


class Normalize(nn.Module):
    """Pixels 0..255 (uint8 or float) -> (x / 255 - mean) / std per channel, in float32."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        m, s = torch.tensor(mean).reshape(1, -1, 1, 1), torch.tensor(std).reshape(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * s), persistent=False)
        self.register_buffer("shift", m / s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale - self.shift


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p else nn.Identity()


class CNN(nn.Module):
    def __init__(self, shape: list[int], hidden: list[int], dropout: float, outputs: int):
        super().__init__()
        c, h, w = shape
        blocks = []
        for width in hidden:
            pool = nn.MaxPool2d(2) if min(h, w) >= 2 else nn.Identity()
            blocks.append(nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), pool))
            c, h, w = width, (h // 2 if min(h, w) >= 2 else h), (w // 2 if min(h, w) >= 2 else w)
        self.blocks = nn.ModuleList(blocks)
        h, w = min(h, MAX_POOLED), min(w, MAX_POOLED)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d((h, w)),
            nn.Flatten(),
            _dropout(dropout),
            nn.Linear(c * h * w, DENSE),
            nn.ReLU(),
            _dropout(dropout),
            nn.Linear(DENSE, outputs),
        )
        self.squeeze = outputs == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        out = self.head(x)
        return out.squeeze(-1) if self.squeeze else out

    def shard_units(self) -> list[nn.Module]:
        return [*self.blocks, self.head]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)


class Block(nn.Module):
    """Two 3×3 convs with group norm and a shortcut (a 1×1 conv where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _norm(cout)
        self.conv2, self.norm2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _norm(cout)
        same = stride == 1 and cin == cout
        self.skip = nn.Identity() if same else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.skip(x))


class ResNet(nn.Module):
    def __init__(self, shape: list[int], hidden: list[int], dropout: float, outputs: int):
        super().__init__()
        c, h, w = shape
        self.stem = nn.Sequential(nn.Conv2d(c, hidden[0], 3, 1, 1, bias=False), _norm(hidden[0]), nn.ReLU())
        blocks, c = [], hidden[0]
        for width in hidden:
            stride = 2 if width > c and min(h, w) >= 2 else 1
            blocks.append(Block(c, width, stride))
            c, h, w = width, -(-h // stride), -(-w // stride)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), _dropout(dropout), nn.Linear(c, outputs))
        self.squeeze = outputs == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        out = self.head(x)
        return out.squeeze(-1) if self.squeeze else out

    def shard_units(self) -> list[nn.Module]:
        return [self.stem, *self.blocks, self.head]


IMAGE_MODELS = {"cnn": CNN, "resnet": ResNet}


class ImageModel(nn.Module):
    """Raw pixels in, logits out: the normalisation, then the network (a built-in family or a factory's)."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.inputs, self.net = Normalize(mean, std), net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.inputs(x))

    def shard_units(self) -> list[nn.Module]:
        chosen = getattr(self.net, "shard_units", None)
        return list(chosen()) if callable(chosen) else list(self.net.children())


def image_architecture(cfg, schema: dict, outputs: int) -> dict:
    """The model file's record of an image model: the train settings it is built from and the input it takes."""
    image = schema["image"]
    arch = {
        "model": cfg.model,
        "image": {"shape": [image["channels"], *image["size"]], "mean": image["mean"], "std": image["std"]},
        "n_features": 0,
        "hidden": list(cfg.hidden),
        "dropout": cfg.dropout,
        "categorical": [],
        "outputs": outputs,
    }
    if cfg.model not in IMAGE_MODELS:  # a factory of your own: what it is given
        arch |= {"task": schema.get("task"), "classes": schema.get("classes"), "features": schema["features"]}
        arch["train"] = cfg.model_dump()
    return arch


def build_image_model(arch: dict) -> nn.Module:
    image = arch["image"]
    if arch["model"] in IMAGE_MODELS:
        net = IMAGE_MODELS[arch["model"]](image["shape"], list(arch["hidden"]), arch["dropout"], arch["outputs"])
    else:
        from tasks.training.factory import from_factory

        net = from_factory(arch)
    return ImageModel(net, image["mean"], image["std"])
