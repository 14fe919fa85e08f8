"""Warm start (train.init_from): a new run's model starts from its parent's weights (tasks/parent.py finds and
checks the parent). Every tensor whose name and shape match is loaded, the bin edges of a piecewise-linear
encoding included (the weights were trained on them); the others keep their fresh initialisation, and the run
says which. The optimizer, schedule and data order start anew: only the weights carry over."""

from __future__ import annotations

import torch
from torch import nn

from tasks.errors import UserError
from tasks.parent import open_parent


def warm_start(net: nn.Module, s, say: bool) -> dict:
    """Load the parent's matching weights into `net` (before DDP or FSDP wrap it); the lineage record, with the
    layers kept and reinitialised."""
    with open_parent(s) as parent:
        try:
            saved = torch.load(parent.weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(
                f"train.init_from: {parent.path} holds objects a Trainflow model never does, and was not unpickled: "
                f"{str(e).splitlines()[0][:200]}"
            ) from None
        lineage = dict(parent.lineage)
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise UserError(f"train.init_from: {parent.path} is not a Trainflow model or checkpoint (no 'model' weights)")
    if saved.get("target") not in (None, s.dataset.target):
        raise UserError(
            f"train.init_from: {parent.path} predicts {saved['target']!r}, this run {s.dataset.target!r} (dataset.target); "
            "point train.init_from at a model of this target"
        )
    theirs, mine = saved["model"], net.state_dict()
    kept = [k for k, v in mine.items() if isinstance(theirs.get(k), torch.Tensor) and theirs[k].shape == v.shape]
    if not kept:
        raise UserError(
            f"train.init_from: no weight of {parent.path} fits this model (train.model, train.hidden or the features "
            "differ in every layer); warm start would be a cold start: set train.init_from: null"
        )
    net.load_state_dict({k: theirs[k] for k in kept}, strict=False)
    fresh = {
        k: f"{list(theirs[k].shape) if k in theirs else 'absent'} there, {list(mine[k].shape)} here"
        for k in mine
        if k not in kept
    }
    if say:
        shown = "; ".join(f"{k} ({v})" for k, v in fresh.items())
        print(
            f"train: warm start from {s.train.init_from} ({parent.kind} {parent.sha256[:12]}…): kept {', '.join(layers(kept))}"
            + (f"; reinitialised {shown}" if fresh else ""),
            flush=True,
        )
    return lineage | {"init_transform": s.train.init_transform, "kept": layers(kept), "reinitialised": fresh}


def layers(names: list[str]) -> list[str]:
    """Tensor names by module ("net.0.weight", "net.0.bias" -> "net.0"), in order."""
    return list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))
