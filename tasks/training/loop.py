"""One rank's training: set up, maybe resume, then one epoch loop (`Trainer.fit`).

Every rank draws the same per-epoch permutation and takes its own slice of each global batch, and its loss
is scaled so that the gradient average over ranks equals the mean over the whole global batch: k steps on
N ranks give the parameters of k steps in one process. Rank 0 alone logs and writes, in a background thread,
into the run's staging directory; the launcher publishes it as train.out_dir when every rank is done.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tasks.errors import InfrastructureError, UserError
from tasks.files import atomic_path, write_json
from tasks.settings import Settings
from tasks.training import checkpoint
from tasks.training.data import load_features, rank_slice
from tasks.training.live import PROGRESS, log_epoch, open_live
from tasks.training.model import architecture, build_model, fit_inputs
from tasks.training.objective import objective_for
from tasks.training.state import full_checkpoint, full_model_state, gathered, resumed_sse, rng_state, set_full_state, set_rng
from tasks.training.sync import Clock, Wrapped, step_times
from tasks.training.warmstart import warm_start
from tasks.training.watchdog import Watchdog


def run_rank(
    s: Settings,
    rank: int,
    world: int,
    local_rank: int,
    init_method: str,
    local_world: int | None = None,
    log: bool = True,
    stop: Callable[[dict], bool] | None = None,
) -> None:
    """One rank of a training run. init_method "" means one process and no process group; "store://HOST:PORT" a
    store the launcher hosts (this rank connects as a client and listens on nothing itself). `stop(record)`, in
    one process only, ends training after an epoch when it returns True (a search's pruner)."""
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if init_method:
        # a collective waits on a dead or hung peer a little longer than the watchdog (which logs the stacks)
        timeout = timedelta(seconds=s.train.step_timeout_s + 60)
        where: dict[str, Any] = {"init_method": init_method}
        if init_method.startswith("store://"):
            host, port = init_method.removeprefix("store://").rsplit(":", 1)
            where = {"store": dist.TCPStore(host, int(port), world, is_master=False, timeout=timeout)}
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            rank=rank,
            world_size=world,
            timeout=timeout,
            **where,
            **({"device_id": device} if cuda else {}),  # type: ignore[arg-type]
        )
    try:
        Trainer(s, rank, world, device, grouped=bool(init_method), local_world=local_world or world, log=log, stop=stop).fit()
    except RuntimeError as e:
        if peer_failed(e):  # a collective failed because a peer died or the network went: infrastructure
            raise InfrastructureError(f"rank {rank}: a collective failed ({str(e).splitlines()[0][:200]})") from e
        raise
    finally:
        if init_method and dist.is_initialized():
            dist.destroy_process_group()


PEER_FAILED = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted", "NCCL error")


def peer_failed(error: RuntimeError) -> bool:
    """gloo reports a dead peer as a plain RuntimeError with its socket's message; NCCL and torch's own
    store errors as DistError."""
    return isinstance(error, dist.DistError) or any(m in str(error) for m in PEER_FAILED)


@dataclass
class RunState:
    """Where training is, and what it has learned so far: what a checkpoint holds beside the weights."""

    epoch: int = 1  # the epoch to train next
    skip: int = 0  # steps of it done before an interruption
    steps: int = 0
    best_val: float = float("inf")
    best_epoch: int = -1
    best_state: dict | None = None
    stale: int = 0  # epochs without a better validation loss
    history: list = field(default_factory=list)


class Trainer:
    def __init__(
        self, s: Settings, rank: int, world: int, device: torch.device, grouped: bool, local_world: int, log: bool, stop=None
    ):
        assert stop is None or not grouped, "a stop hook decides for one process; ranks would disagree"
        cfg = self.cfg = s.train
        self.stop = stop
        self.rank, self.world, self.device, self.grouped, self.master = rank, world, device, grouped, rank == 0
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        torch.manual_seed(cfg.seed)
        self.out = checkpoint.staging_dir(cfg.out_dir)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)
        transform, schema = _features_meta(s)
        self.objective = objective_for(transform, cfg.class_weights, (schema.get("class_rows") or {}).get("train"))
        if schema.get("modality") == "image":  # streamed from uint8 shards (tasks/images/loader.py)
            from tasks.images.loader import ImageData

            self.data: Any = ImageData(Path(s.preprocess.out_dir), device, self.objective, rank, world, cfg)
        else:
            self.data = load_features(Path(s.preprocess.out_dir), device, self.objective)
        self.arch = architecture(cfg, self.data.schema, self.objective.outputs)
        self.clock = Clock(device)
        net = build_model(self.arch).to(device)
        if hasattr(self.data, "x_train"):  # tables (image models learn nothing from the inputs before training)
            fit_inputs(net, self.data.x_train)  # before DDP or FSDP take the model over
        # train.init_from: the parent's weights (an interrupted run then resumes from its own checkpoint below)
        self.parent = warm_start(net, s, say=self.master) if cfg.init_from else None
        self.net = Wrapped(net, cfg, device, grouped, self.clock)
        model = self.net.model
        # one process on a GPU: CUDA graphs too (a small model's step is otherwise bound by kernel launches)
        cuda_graphs = device.type == "cuda" and not grouped
        self.forward = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None) if cfg.compile else model
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.order = torch.Generator().manual_seed(cfg.seed)  # the same data order on every rank
        self.run_id = checkpoint.fingerprint(cfg.model_dump(), {"schema": self.data.schema, "transform": self.data.transform})
        self.every, self.unit = int(cfg.checkpoint_every.split()[0]), cfg.checkpoint_every.split()[1].rstrip("s")
        self.steps_per_epoch = math.ceil(self.data.n_train / cfg.batch_size)
        self.sched = schedule(self.opt, cfg, self.steps_per_epoch)
        self.resumed = self.resume()
        self.live = open_live(cfg.log_dir, len(self.at.history) if self.resumed else None) if self.master and log else None
        # rank 0's writes (metrics, checkpoints) run in one background thread, in order
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="trainflow-writer")
        self.writes: list = []

    def resume(self) -> dict | None:
        """An interrupted run of the same settings and features continues from its last valid checkpoint."""
        cfg, ckpts = self.cfg, self.out / "checkpoints"
        state = (
            checkpoint.load_from(cfg.resume_from, self.arch) if cfg.resume_from else checkpoint.load_latest(ckpts, self.run_id)
        )
        self.at = RunState()
        if state is not None:
            set_full_state(self.net.model, self.opt, self.net.fsdp, state["model"], state["optimizer"])
            if set(state["scheduler"]) != set(self.sched.state_dict()):
                raise UserError(
                    f"train.resume_from={cfg.resume_from}: it was trained with another learning rate schedule than "
                    f"train.schedule={cfg.schedule}; set train.schedule to the one it was started with"
                )
            self.sched.load_state_dict(state["scheduler"])
            ends = getattr(self.sched, "total_steps", None)
            if ends is not None and ends != cfg.epochs * self.steps_per_epoch:
                raise UserError(
                    f"train.resume_from={cfg.resume_from}: its onecycle schedule ends at step {ends}, and "
                    f"train.epochs={cfg.epochs} makes {cfg.epochs * self.steps_per_epoch} steps; a one-cycle schedule "
                    "cannot be lengthened: resume with the epochs it was started with, or set train.schedule: cosine"
                )
            self.order.set_state(state["order_state"])
            b = state["best"]
            self.at = RunState(
                state["epoch"],
                state["step_in_epoch"],
                state["steps"],
                b["val"],
                b["epoch"],
                b["state"],
                b["stale"],
                list(state["history"]),
            )
            set_rng(state["rng"], self.rank, self.world, self.device)
            if self.master:
                print(
                    f"train: resuming from {state['path']} (epoch {self.at.epoch}, step {self.at.skip} of it, "
                    f"{self.at.steps} steps done)",
                    flush=True,
                )
        elif self.master:
            import shutil

            shutil.rmtree(ckpts, ignore_errors=True)  # another run's checkpoints (other settings or features)
        if self.grouped:
            dist.barrier()  # every rank has read the checkpoints before any is removed or written
        return state

    def fit(self) -> None:
        cfg, at = self.cfg, self.at
        in_process = not self.grouped and not os.environ.get("RANK")
        self.watchdog = Watchdog(
            cfg.step_timeout_s, self.rank, in_process=in_process, dump_to=self.out / f"hung-rank{self.rank}.log"
        )
        self.resumed_at = time.time()  # training (re)starts here: with a fault's time, the time to recover
        t0, rows = time.perf_counter(), 0
        epoch = at.epoch - 1
        try:
            for epoch in range(at.epoch, cfg.epochs + 1):
                # one pass over the train set: rank r takes the r-th slice of every global batch
                epoch_t0 = time.perf_counter()
                sse, marks, done = self.train_epoch(epoch)
                rows += done
                # validation, then one all-reduce of the losses and step times: one host sync per epoch
                totals = self.reduce(sse, self.validate(), step_times(self.clock, marks))
                record = self.record(epoch, sse, totals, time.perf_counter() - epoch_t0)
                record["lr"] = self.epoch_end_lr(epoch, record["val_loss"])
                # early stopping (every rank takes the same decision), the record, a checkpoint (rank 0 writes)
                if record["val_loss"] < at.best_val:
                    at.best_val, at.best_epoch, at.stale = record["val_loss"], epoch, 0
                    at.best_state = full_model_state(self.net.model, self.net.fsdp)
                else:
                    at.stale += 1
                at.history.append(record)
                if self.master:
                    self.writes.append(self.writer.submit(log_epoch, self.live, record, self.out / PROGRESS))
                stopped = at.stale >= cfg.patience or (self.stop is not None and self.stop(record))
                if self.unit == "step" or epoch % self.every == 0 or stopped or epoch == cfg.epochs:
                    self.save(epoch + 1, 0, self.order.get_state(), None)
                if stopped:
                    break
        finally:
            self.watchdog.stop()
            self.data.close()
            self.writer.shutdown(wait=True)  # every checkpoint a message may mention is on disk
        for write in self.writes:
            write.result()  # a failed write fails the run
        self.finish(epoch, rows, time.perf_counter() - t0)

    def train_epoch(self, epoch: int) -> tuple[torch.Tensor, list, int]:
        """One epoch's steps: this rank's loss per step (on the device: no host sync), step timings, rows seen."""
        at, B = self.at, self.cfg.batch_size
        self.net.model.train()
        epoch_order = self.order.get_state()  # with the position in the epoch, the data-order state
        perm = torch.randperm(self.data.n_train, generator=self.order).to(self.device)
        self.data.start_epoch(perm, epoch, at.skip)
        sse = torch.zeros(self.steps_per_epoch, device=self.device)
        if at.skip and self.resumed is not None and self.resumed.get("partial_sse") is not None:
            sse[: at.skip] = resumed_sse(self.resumed["partial_sse"], self.rank, self.world)
        marks, previous, rows = [], self.clock.now(), 0
        for i, start in enumerate(range(0, self.data.n_train, B)):
            if i < at.skip:  # done before the interruption: the same batches, not trained again
                continue
            idx = perm[start : start + B]
            sse[i], taken = self.step(idx)
            end = self.clock.now()
            marks.append((previous, taken, *self.net.sync.take(), end))
            previous = end
            at.steps, rows = at.steps + 1, rows + len(idx)
            self.watchdog.step()
            if self.unit == "step" and at.steps % self.every == 0 and i + 1 < self.steps_per_epoch:  # (an epoch's end: later)
                # every rank's losses so far: a resumed epoch reports the same loss
                self.save(epoch, i + 1, epoch_order, gathered(sse[: i + 1].double().cpu().tolist(), self.world, self.grouped))
        at.skip = 0
        return sse, marks, rows

    def step(self, idx: torch.Tensor) -> tuple[torch.Tensor, object]:
        """One optimizer step on this rank's slice of a global batch (in grad_accum_steps micro-batches)."""
        cfg, net, world, m = self.cfg, self.net, self.world, len(idx)
        mine = rank_slice(idx, self.rank, world)
        parts = mine.tensor_split(cfg.grad_accum_steps) if cfg.grad_accum_steps > 1 else (mine,)
        micro = [self.data.train_batch(part) for part in parts]
        taken = self.clock.now()
        self.opt.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        for k, (xb, yb) in enumerate(micro):
            with net.accumulating(net.local_sgd or k < len(micro) - 1):
                with self.autocast:
                    predicted = self.forward(xb)
                part = self.objective.loss_sum(predicted, yb)
                (part * (world / m)).backward()  # ranks average gradients -> the mean over the global batch
            loss += part.detach()
        self.opt.step()
        if self.cfg.schedule == "onecycle":
            self.sched.step()
        net.average()
        return loss, taken

    def epoch_end_lr(self, epoch: int, val_loss: float) -> float:
        """The epoch's step of an epoch-wise schedule (plateau's decision from the validation loss every rank
        has); the learning rate the next epoch starts with."""
        before = self.sched.get_last_lr()[0]
        if self.cfg.schedule == "cosine":
            self.sched.step()
        elif self.cfg.schedule == "plateau":
            self.sched.step(val_loss)
        lr = self.sched.get_last_lr()[0]
        if lr < before and self.cfg.schedule == "plateau" and self.master:
            print(
                f"train: epoch {epoch}: no better validation loss for {self.sched.patience + 1} epochs; "
                f"lr {before:.3g} -> {lr:.3g}",
                flush=True,
            )
        return lr

    def validate(self) -> torch.Tensor:
        """Each rank scores its shard of the validation split in the same number of chunks (FSDP needs every
        rank in every forward); the sums the objective's record needs (its loss first)."""
        self.net.model.eval()
        with torch.no_grad(), self.autocast:
            batches = self.data.val_batches(self.rank, self.world)
            total = sum(self.objective.val_sums(self.net.model(x), y).double() for x, y in batches)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.watchdog.beat()
        return total

    def reduce(self, sse: torch.Tensor, val: torch.Tensor, timing: dict) -> torch.Tensor:
        """[train loss sum, the validation sums..., data, compute, sync and train seconds]: one all-reduce."""
        times = [timing["data"], timing["compute"], timing["sync"], timing["train"]]
        totals = torch.cat(
            [
                sse.sum().double().reshape(1),
                torch.as_tensor(val, dtype=torch.float64).reshape(-1).to(self.device),
                torch.tensor(times, dtype=torch.float64, device=self.device),
            ]
        )
        if self.grouped:
            dist.all_reduce(totals)
        totals[-4:] /= self.world  # step times: the mean over ranks
        return totals

    def record(self, epoch: int, sse: torch.Tensor, totals: torch.Tensor, seconds: float) -> dict:
        """The epoch in figures; a loss that became nan or inf stops the run, naming the step and the rank."""
        values = totals.tolist()
        val, (data_s, compute_s, sync_s, step_s) = values[1:-4], values[-4:]
        record = {"epoch": epoch, **self.objective.record(values[0], val, self.data.n_train, self.data.n_val)}
        if not math.isfinite(record["train_loss"]):
            self.diverged(epoch, sse, record["train_loss"])
        return record | {
            "lr": None,  # (the learning rate the next epoch starts with: epoch_end_lr)
            "samples_per_s": self.data.n_train / step_s if step_s > 0 else None,
            "data_s": data_s,
            "compute_s": compute_s,
            "sync_s": sync_s if self.grouped and not self.net.fsdp else None,
            "seconds": seconds,
        }

    def diverged(self, epoch: int, sse: torch.Tensor, loss: float) -> None:
        bad = ~torch.isfinite(sse)
        mine = torch.tensor(
            self.at.steps - self.steps_per_epoch + int(bad.nonzero()[0]) + 1 if bad.any() else -1, device=self.device
        )
        firsts = [torch.zeros_like(mine) for _ in range(self.world)] if self.grouped else [mine]
        if self.grouped:
            dist.all_gather(firsts, mine)
        step, where = min((int(b), r) for r, b in enumerate(firsts) if int(b) >= 0)
        ckpts = self.out / "checkpoints"
        kept = f"; the checkpoints before it are in {ckpts}" if checkpoint.listed(ckpts) or self.writes else ""
        raise UserError(
            f"train: loss became {loss} at step {step} (epoch {epoch}) on rank {where}{kept}; "
            f"{self.cfg.out_dir} keeps the last good model. Lower train.lr (now {self.cfg.lr})"
        )

    def save(self, epoch: int, step_in_epoch: int, order_state: torch.Tensor, partial: list | None) -> None:
        """A checkpoint of the contract's state (gathered on every rank; rank 0 writes it in the background)."""
        at, master = self.at, self.master
        model_state, optim_state = (
            full_checkpoint(self.net.model, self.opt, self.net.fsdp) if master or self.net.fsdp else (None, None)
        )
        rngs = gathered(rng_state(self.device), self.world, self.grouped)
        if not master:
            return
        state = {
            "fingerprint": self.run_id,
            "arch": self.arch,
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": copy.deepcopy(self.sched.state_dict()),
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "steps": at.steps,
            "order_state": order_state.clone(),
            "rng": rngs,
            "partial_sse": partial,
            "best": {"val": at.best_val, "epoch": at.best_epoch, "state": at.best_state, "stale": at.stale},
            "history": copy.deepcopy(at.history),
        }
        self.writes.append(self.writer.submit(checkpoint.save, self.out / "checkpoints", state, self.cfg.keep_checkpoints))

    def finish(self, epoch: int, rows: int, seconds: float) -> None:
        """Rank 0 writes the best model and the run's summary; then every rank waits for it."""
        at, data = self.at, self.data
        if self.master:
            with atomic_path(self.out / "model.pt") as tmp:
                torch.save(
                    {
                        "arch": self.arch,
                        "model": at.best_state,
                        "features": data.schema["features"],
                        "target": data.schema["target"],
                        "target_mean": self.objective.mean,
                        "target_std": self.objective.std,
                        **{k: data.transform.get(k) for k in ("task", "target_transform", "classes", "label_dtype", "modality")},
                    },
                    tmp,
                )
            write_json(self.out / "summary.json", self.summary(epoch, rows, seconds))
            if self.live is not None:
                self.live.end()
        if self.grouped:
            dist.barrier()

    def summary(self, epoch: int, rows: int, seconds: float) -> dict:
        at, state = self.at, self.resumed
        summary = {
            "best_epoch": at.best_epoch,
            "epochs_run": epoch,
            f"best_{self.objective.metric}": next(
                (h[self.objective.metric] for h in at.history if h["epoch"] == at.best_epoch), None
            ),
            "world_size": self.world,
            "device": self.device.type,
            "strategy": self.cfg.strategy,
            "precision": "bf16" if self.bf16 else "fp32",
            "steps": at.steps,
            "seconds": round(seconds, 3),
            "epochs_wall": [self.resumed_at, time.time()],  # when the epochs ran (the iteration report's phase)
            "samples_per_s": round(rows / seconds, 1),
            "resumed_from": None
            if state is None
            else {
                "checkpoint": state["path"],
                "epoch": state["epoch"],
                "step_in_epoch": state["step_in_epoch"],
                "steps": state["steps"],
                "at": self.resumed_at,
            },
            "parent": self.parent,  # warm start's lineage (train.init_from), or None
            "time_split_s": {k: round(sum(h[f"{k}_s"] or 0.0 for h in at.history), 4) for k in ("data", "compute", "sync")},
            "epochs": at.history,
        }
        if self.device.type == "cuda":
            summary["gpu_peak_memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        return summary


def schedule(opt: torch.optim.Optimizer, cfg, steps_per_epoch: int):
    """train.schedule's learning rate scheduler (its state is in every checkpoint)."""
    sched = torch.optim.lr_scheduler
    if cfg.schedule == "onecycle":
        # a short warm-up (torch's default is 30% of the steps): California Housing's validation RMSE reaches
        # 0.50 in ~11 epochs instead of 19, to the same final RMSE over 3 seeds (bench/quality.py)
        return sched.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.05)
    if cfg.schedule == "plateau":
        return sched.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, cfg.patience // 3))
    return sched.CosineAnnealingLR(opt, T_max=cfg.epochs)


def _features_meta(s: Settings) -> tuple[dict, dict]:
    """transform.json and schema.json of the features."""
    import json

    feat_dir = Path(s.preprocess.out_dir)
    return json.loads((feat_dir / "transform.json").read_text()), json.loads((feat_dir / "schema.json").read_text())
