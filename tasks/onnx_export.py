"""Export a torch module to ONNX the one way Trainflow does: torch.export-based (dynamo), weights inside the file,
a dynamic batch dimension, and without the exporter's per-node debug metadata (Python stack traces with this
machine's paths), so the same model exports to the same bytes anywhere."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch


def export(module: torch.nn.Module, example: torch.Tensor, path: Path, output: str = "prediction") -> None:
    # the exporter warns about torchvision ops and torch-internal deprecations that do not concern us
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            verbose=False,
            input_names=["features"],
            output_names=[output],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    reproducible(path)


def reproducible(path: Path) -> None:
    """Drop the exporter's per-node debug metadata."""
    import onnx

    model = onnx.load(str(path))
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            del node.metadata_props[:]
            graphs += [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]
    onnx.save(model, str(path))
