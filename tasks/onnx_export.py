"""Export a torch module to ONNX the one way Trainflow does: torch.export-based (dynamo), weights inside the file,
a dynamic batch dimension, and without the exporter's per-node debug metadata (Python stack traces with this
machine's paths), so the same model exports to the same bytes anywhere."""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from pathlib import Path

import torch

_torch_builds: list[classmethod] = []  # torch's own ONNXRegistry.from_torchlib (replaced during an export)


@functools.cache
def torchlib_registry(opset_version: int | None = None):
    """The exporter's registry of ONNX functions (torchlib) for every ATen op, built once per process instead of
    on every export (0.6 s each): `trainflow serve`'s warm process builds it for the runs it forks. Read-only
    here: Trainflow registers no custom translations."""
    from torch.onnx._internal.exporter import _constants, _registration

    build = (_torch_builds or [_registration.ONNXRegistry.__dict__["from_torchlib"]])[0]
    return build.__func__(_registration.ONNXRegistry, opset_version or _constants.TORCHLIB_OPSET)


@contextlib.contextmanager
def _registry_built_once():
    """torch.onnx.export, within this block, takes its registry from torchlib_registry (where torch still builds
    it by ONNXRegistry.from_torchlib; else as torch does)."""
    from torch.onnx._internal.exporter import _registration

    built = _registration.ONNXRegistry.__dict__.get("from_torchlib")
    if not isinstance(built, classmethod):
        yield
        return
    _torch_builds[:] = [built]
    _registration.ONNXRegistry.from_torchlib = classmethod(lambda cls, opset_version=None: torchlib_registry(opset_version))
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = built


def export(module: torch.nn.Module, example: torch.Tensor, path: Path, output: str = "prediction") -> None:
    # the exporter warns about torchvision ops and torch-internal deprecations that do not concern us
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), _registry_built_once():
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
