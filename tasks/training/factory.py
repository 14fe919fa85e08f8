"""A model of your own: `train.model: "package.module:factory"`.

The contract (docs/training.md): `factory(schema, settings) -> torch.nn.Module`, where
- `schema` is a dict: `features` (input column names, in order), `n_features`, `categorical` (per code column:
  name, index into the features, cardinality: codes 0..cardinality-1, 0 = out of vocabulary), `task`
  (regression | binary | multiclass), `classes` (the labels, or None) and `outputs`;
- `settings` is the run's `train` settings (TrainSettings: hidden, dropout, seed, ...);
- the module maps a float32 tensor (batch, n_features) to (batch,) when outputs is 1 (a number, standardised;
  or a binary logit) and to (batch, outputs) otherwise (one logit per class). No softmax or sigmoid: the loss
  and the package add them.
The stage checks the factory before any rank starts (`check_factory`): importable, returns a module with
finite parameters, the right output shape on a real batch, and exportable to ONNX; each failure is a message
naming the factory and what it must do. The same launchers, DDP/FSDP, checkpoints, gate and package then work.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch
from torch import nn

from tasks.errors import UserError


def resolve(spec: str):
    """'package.module:factory' -> the callable; UserError naming what failed."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module raised while importing
        raise UserError(
            f"train.model={spec}: cannot import {module_name} ({type(e).__name__}: {e}); the module must be importable "
            "from the project root (a package there, or installed in the environment)"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(
            f"train.model={spec}: {module_name} has no callable {attr!r}; name a function (schema, settings) -> nn.Module"
        )
    return factory


def schema_of(arch: dict) -> dict:
    """What a factory is given of the data (see the module docstring)."""
    return {
        "features": list(arch["features"]),
        "n_features": arch["n_features"],
        "categorical": list(arch.get("categorical") or []),
        "task": arch.get("task", "regression"),
        "classes": arch.get("classes"),
        "outputs": arch.get("outputs", 1),
        **({"modality": "image", "shape": arch["image"]["shape"]} if "image" in arch else {}),
    }


def from_factory(arch: dict) -> nn.Module:
    """The module `arch["model"]`'s factory builds for this data and these train settings."""
    from tasks.settings import TrainSettings

    spec = arch["model"]
    factory = resolve(spec)
    try:
        model = factory(schema_of(arch), TrainSettings.model_validate(arch["train"]))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"train.model={spec}: the factory raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"train.model={spec}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def example_batch(arch: dict, rows: int = 4) -> torch.Tensor:
    """A batch the model must take: standard normal numeric features, valid codes in the categorical columns."""
    g = torch.Generator().manual_seed(0)
    if "image" in arch:  # pixels, as the loader and the package give them
        return torch.randint(0, 256, (rows, *arch["image"]["shape"]), generator=g, dtype=torch.uint8)
    x = torch.randn(rows, arch["n_features"], generator=g)
    for c in arch.get("categorical") or []:
        x[:, c["index"]] = torch.randint(0, c["cardinality"], (rows,), generator=g).float()
    return x


def check_factory(arch: dict, export_to: Path | None = None) -> None:
    """The contract, checked in the stage's process before any rank starts."""
    spec, outputs = arch["model"], arch.get("outputs", 1)
    model = from_factory(arch)
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise UserError(f"train.model={spec}: parameters {bad[:5]} are not finite after the factory; initialise them")
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"train.model={spec}: the module has no trainable parameters")
    x = example_batch(arch)
    want = (len(x),) if outputs == 1 else (len(x), outputs)
    try:
        with torch.no_grad():
            out = model.eval()(x)
    except Exception as e:
        raise UserError(
            f"train.model={spec}: the module failed on a batch of shape {tuple(x.shape)} ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(
            f"train.model={spec}: the module returned {got} for a batch of {len(x)} rows; a {arch.get('task', 'regression')} "
            f"model must return a tensor of shape {want} ({'one value per row' if outputs == 1 else 'one logit per class'})"
        )
    if export_to is not None:
        check_export(model, x, spec, export_to)


def check_export(model: nn.Module, x: torch.Tensor, spec: str, path: Path) -> None:
    """The package exports the model to ONNX for any batch size: find out now, not after training. The exported
    graph must take another batch size than the example's and agree with torch on it."""
    import numpy as np
    import onnxruntime as ort

    from tasks.onnx_export import export

    where = f"{type(model).__name__}, {inspect.getsourcefile(type(model)) or '?'}"
    other = torch.cat([x, x[:1]])  # one more row than the example
    try:
        export(model.eval(), x, path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"features": other.numpy()})[0]
    except Exception as e:
        raise UserError(
            f"train.model={spec}: the module ({where}) cannot be exported to ONNX for any batch size "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); use operations torch.export supports, no "
            "data-dependent Python control flow, and x.shape[0] rather than len(x) for the batch size"
        ) from None
    finally:
        path.unlink(missing_ok=True)
    with torch.no_grad():
        want = model(other).numpy()
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise UserError(f"train.model={spec}: the module ({where}) exported to ONNX gives other values than in torch")
