"""A rank's state beyond the model's weights: random number generators, and whole (gathered) model and
optimizer states for checkpoints and the model file."""

from __future__ import annotations

import copy
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def rng_state(device: torch.device) -> dict:
    npk: Any = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [npk[0], torch.from_numpy(npk[1].astype(np.int64)), int(npk[2]), int(npk[3]), float(npk[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng(states: list[dict], rank: int, world: int, device: torch.device) -> None:
    if len(states) != world:
        return  # another world size: the data order is exact, dropout masks are not
    s = states[rank]
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def gathered(mine, world: int, grouped: bool) -> list:
    """Every rank's `mine` (plain values and CPU tensors), in rank order: a collective between this run's own ranks."""
    if not grouped:
        return [mine]
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    return everyone


def resumed_sse(partial: list[list[float]], rank: int, world: int) -> torch.Tensor:
    """This rank's share of the losses of the steps done before the interruption: its own, or, after an elastic
    relaunch on another number of ranks, all of them on rank 0 (the epoch's sum is what counts)."""
    if len(partial) == world:
        return torch.tensor(partial[rank])
    return torch.tensor(partial).sum(0) if rank == 0 else torch.zeros(len(partial[0]))


def unwrapped(model):
    return model.module if isinstance(model, DDP) else model


def full_model_state(model, fsdp: bool) -> dict:
    """The whole model's weights on the CPU (gathered from the shards with FSDP: a collective on every rank)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    raw = unwrapped(model)
    return {k: v.detach().cpu().clone() for k, v in raw.state_dict().items()}


def full_checkpoint(model, opt, fsdp: bool) -> tuple[dict, dict]:
    """Model and optimizer state as whole tensors (gathered on every rank under FSDP; rank 0 writes them)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    raw = unwrapped(model)
    return ({k: v.detach().clone() for k, v in raw.state_dict().items()}, copy.deepcopy(opt.state_dict()))


def set_full_state(model, opt, fsdp: bool, model_state: dict, optim_state: dict) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model,
            opt,
            model_state_dict=model_state,
            optim_state_dict=optim_state,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False),
        )
        return
    unwrapped(model).load_state_dict(model_state)
    opt.load_state_dict(optim_state)
