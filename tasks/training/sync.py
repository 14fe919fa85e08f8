"""How ranks combine gradients, and where a step's time goes.

DDP all-reduces gradient buckets while the backward pass runs (train.grad_sync picks the communication hook,
or local SGD's periodic parameter averaging); FSDP2 shards parameters, gradients and optimizer state and
reduce-scatters. Each step is split into data (taking the batch), compute (forward, backward, optimizer) and
sync (communication not hidden behind the backward pass), timed with CUDA events on GPU and the host clock
on CPU: no host sync per step.
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from tasks.training.model import shard_units


class Clock:
    """Timestamps that cost no host sync: CUDA events on GPU (read once per epoch), the host clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start


class SyncTimer:
    """The exposed gradient sync of a step: from the moment the last gradient bucket is ready (the backward
    pass is done) until its reduction completes. Wraps a DDP communication hook; local SGD marks its
    parameter averaging the same way."""

    def __init__(self, clock: Clock):
        self.clock, self.ready, self.done = clock, None, None

    def wrap(self, hook):
        def timed(state, bucket):
            self.ready = self.clock.now()
            future = hook(state, bucket)

            def mark(fut):
                self.done = self.clock.now()  # on GPU: recorded on a stream synchronized with the reduction
                return fut.value()

            return future.then(mark)

        return timed

    def take(self) -> tuple:
        marks, self.ready, self.done = (self.ready, self.done), None, None
        return marks


def step_times(clock: Clock, marks: list[tuple]) -> dict:
    """Seconds of the epoch's steps spent taking batches, computing and waiting for gradient sync."""
    data = compute = synced = 0.0
    for start, taken, ready, done, end in marks:
        step = clock.seconds(start, end)
        d = clock.seconds(start, taken)
        s = max(0.0, clock.seconds(ready, done)) if ready is not None and done is not None else 0.0
        data, synced, compute = data + d, synced + s, compute + max(0.0, step - d - s)
    train = clock.seconds(marks[0][0], marks[-1][-1]) if marks else 0.0
    return {"data": data, "compute": compute, "sync": synced, "train": train}


def _bf16_compress_hook(_state, bucket):
    """All-reduce a gradient bucket as bfloat16 (half the bytes), averaged over ranks, like fp16_compress_hook."""
    compressed = bucket.buffer().to(torch.bfloat16).div_(dist.get_world_size())
    future = dist.all_reduce(compressed, async_op=True).get_future()

    def decompress(fut):
        out = bucket.buffer()
        out.copy_(fut.value()[0])
        return out

    return future.then(decompress)


def grad_sync(model: Any, cfg, timer: SyncTimer):
    """Install train.grad_sync on a DDP model (timed); returns the parameter averager of local SGD (else None)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if cfg.grad_sync == "local_sgd":
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

        return PeriodicModelAverager(period=cfg.local_sgd_period, warmup_steps=0)
    state: Any = None
    hook: Any = default_hooks.allreduce_hook
    if cfg.grad_sync == "fp16":
        hook = default_hooks.fp16_compress_hook
    elif cfg.grad_sync == "bf16":  # torch's bf16 hook insists on NCCL; gloo all-reduces bfloat16 as well
        hook = _bf16_compress_hook
    elif cfg.grad_sync == "powersgd":
        # rank-1 compression with error feedback, after 10 exact warm-up steps
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=10, min_compression_rate=2
        )
        hook = powerSGD_hook.powerSGD_hook
    model.register_comm_hook(state, timer.wrap(hook))
    return None


# what dvclive logs (dvc metrics show / plots): losses, the validation metric, the LR and speed; the step time's
# split per epoch is in summary.json and the flow's training-epochs artifact


class Wrapped:
    """The model as this run trains it: plain (one process), DDP or FSDP; how a micro-batch keeps its gradients
    local; the parameter averager of local SGD; the sync timer."""

    def __init__(self, model: torch.nn.Module, cfg, device: torch.device, grouped: bool, clock: Clock):
        self.fsdp = cfg.strategy == "fsdp"
        self.ddp = grouped and not self.fsdp
        self.sync = SyncTimer(clock)
        self.model: Any  # plain, DDP or FSDP: torch's types for them share no interface
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            # the model's output is a view (squeeze); nothing here modifies it in place, which is what FSDP warns of
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
            for unit in shard_units(model):
                fully_shard(unit)
            self.model = fully_shard(model)
        elif self.ddp:
            self.model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            self.model = model
        self.averager = grad_sync(self.model, cfg, self.sync) if self.ddp else None
        self.local_sgd = self.ddp and cfg.grad_sync == "local_sgd"

    def accumulating(self, quiet: bool):
        """Gradients of this micro-batch stay local (synced with the last one; never, with local SGD)."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(not quiet)
        return self.model.no_sync() if self.ddp and quiet else nullcontext()

    def average(self) -> None:
        """Local SGD: every local_sgd_period steps, average the parameters (timed as sync)."""
        if self.averager is not None:
            self.sync.ready = self.sync.clock.now()
            self.averager.average_parameters(self.model.parameters())
            self.sync.done = self.sync.clock.now()
