"""Train the MLP regressor with PyTorch DDP.  Run: python -m tasks.train  (or under torchrun)

`train.world_size` ranks run as local processes (gloo on CPU, NCCL on GPU); under `torchrun` the ranks
come from its environment. Every rank draws the same per-epoch permutation and takes its own slice of
each global batch, and its loss is scaled so that DDP's gradient average equals the mean over the whole
global batch: k steps on N ranks give the parameters of k steps in one process. Rank 0 alone logs
(dvclive) and writes files, into a staging directory that replaces `train.out_dir` only when training
finishes, so a failed run never touches the previous model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from tasks.files import atomic_path, replace_dir, write_json
from tasks.model import build_model
from tasks.settings import Settings, UserError, cli

EVAL_CHUNK = 65536


def load_split(directory: Path, features: list[str], target: str) -> tuple[torch.Tensor, torch.Tensor]:
    table = pq.read_table(directory, columns=features + [target])
    x = np.stack([table.column(c).to_numpy() for c in features], axis=1).astype(np.float32)
    y = table.column(target).to_numpy().astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


def staging_dir(out_dir: str) -> Path:
    out = Path(out_dir)
    return out.with_name(f".{out.name}.partial")


def fresh_staging_dir(out_dir: str) -> Path:
    """An empty staging directory for a new training run (rank 0 / the launcher only)."""
    out = staging_dir(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


def run_rank(s: Settings, rank: int, world: int, local_rank: int, init_method: str) -> None:
    cfg, feat_dir = s.train, Path(s.preprocess.out_dir)
    ddp = world > 1
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank,
                                world_size=world, timeout=timedelta(minutes=10))
    master = rank == 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    torch.manual_seed(cfg.seed)
    out = staging_dir(cfg.out_dir)

    # data: whole splits in memory as tensors; batches are index slices (no per-sample Python)
    schema = json.loads((feat_dir / "schema.json").read_text())
    transform = json.loads((feat_dir / "transform.json").read_text())
    features, target = schema["features"], schema["target"]
    x_train, y_train = load_split(feat_dir / "train", features, target)
    x_val, y_val = load_split(feat_dir / "val", features, target)
    t_mean, t_std = transform["target_mean"], transform["target_std"]
    y_train, y_val = (y_train - t_mean) / t_std, (y_val - t_mean) / t_std
    x_train, y_train, x_val, y_val = (t.to(device) for t in (x_train, y_train, x_val, y_val))
    n_train, B = len(x_train), cfg.batch_size

    # model, optimizer, schedule
    arch = {"model": cfg.model, "n_features": len(features), "hidden": list(cfg.hidden), "dropout": cfg.dropout,
            "categorical": schema.get("categorical", [])}
    raw_model = build_model(arch).to(device)
    model = DDP(raw_model, device_ids=[local_rank] if cuda else None) if ddp else raw_model
    averager = grad_sync(model, cfg) if ddp else None
    local_sgd = ddp and cfg.grad_sync == "local_sgd"
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    order = torch.Generator().manual_seed(cfg.seed)  # same data order on every rank

    live = None
    if master:
        from dvclive import Live

        live = Live(dir=cfg.log_dir, dvcyaml=False, save_dvc_exp=False)
    best_val, best_epoch, best_state, stale = float("inf"), -1, None, 0
    t0, steps = time.perf_counter(), 0
    for epoch in range(1, cfg.epochs + 1):
        # one pass over the train set: rank r takes the r-th slice of every global batch
        model.train()
        perm = torch.randperm(n_train, generator=order).to(device)
        sse = torch.zeros((), device=device)
        first_bad = torch.full((), -1, dtype=torch.long, device=device)  # the first step with a non-finite loss
        for start in range(0, n_train, B):
            idx = perm[start:start + B]
            m = len(idx)
            mine = idx[rank * m // world:(rank + 1) * m // world]
            opt.zero_grad(set_to_none=True)
            micro = mine.tensor_split(cfg.grad_accum_steps)
            for k, part in enumerate(micro):
                # gradients sync once, with the last micro-batch (never, with local SGD)
                quiet = ddp and (local_sgd or k < len(micro) - 1)
                with model.no_sync() if quiet else nullcontext():
                    err = model(x_train[part]) - y_train[part]
                    loss = err.pow(2).sum() * (world / m)  # DDP averages over ranks -> mean over the global batch
                    loss.backward()
                sse += err.detach().pow(2).sum()
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), steps + 1, first_bad)  # no host sync
            opt.step()
            if averager is not None:
                averager.average_parameters(model.parameters())
            steps += 1
        sched.step()

        # validation: each rank scores its shard; sums are all-reduced (a host sync, once per epoch)
        model.eval()
        with torch.no_grad():
            shard = torch.arange(rank, len(x_val), world, device=device)
            val_sse = sum(((raw_model(x_val[c]) - y_val[c]).pow(2).sum() for c in shard.split(EVAL_CHUNK)),
                          torch.zeros((), device=device))
        totals = torch.stack([sse, val_sse]).double()
        if ddp:
            dist.all_reduce(totals)
        train_mse, val_mse = totals[0].item() / n_train, totals[1].item() / len(x_val)
        if not np.isfinite(train_mse):
            bad = [torch.zeros_like(first_bad) for _ in range(world)] if ddp else [first_bad]
            if ddp:
                dist.all_gather(bad, first_bad)
            step, where = min((int(b), r) for r, b in enumerate(bad) if int(b) >= 0) if any(int(b) >= 0 for b in bad) else (steps, rank)
            kept = f"; the checkpoints of epochs 1-{epoch - 1} are in {out / 'checkpoints'}" if epoch > 1 else ""
            raise UserError(f"train: loss became {train_mse} at step {step} (epoch {epoch}) on rank {where}{kept}; "
                            f"{cfg.out_dir} keeps the last good model. Lower train.lr (now {cfg.lr})")

        # early stopping and checkpoints (rank 0 writes; every rank takes the same decision)
        improved = val_mse < best_val
        if improved:
            best_val, best_epoch, stale = val_mse, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in raw_model.state_dict().items()}
        else:
            stale += 1
        if master:
            val_rmse = float(np.sqrt(val_mse)) * t_std
            live.log_metric("train/loss", train_mse)
            live.log_metric("val/loss", val_mse)
            live.log_metric("val/rmse", val_rmse)
            live.log_metric("lr", sched.get_last_lr()[0])
            live.next_step()
            save_checkpoint(out / "checkpoints" / f"epoch-{epoch:04d}.pt", raw_model, opt, sched, epoch, best_val, arch)
            for old in sorted((out / "checkpoints").glob("epoch-*.pt"))[:-cfg.keep_checkpoints]:
                old.unlink()
        if stale >= cfg.patience:
            break

    seconds = time.perf_counter() - t0
    if master:
        with atomic_path(out / "model.pt") as tmp:
            torch.save({"arch": arch, "model": best_state, "features": features, "target": target,
                        "target_mean": t_mean, "target_std": t_std}, tmp)
        summary = {
            "best_epoch": best_epoch, "epochs_run": epoch, "best_val_rmse": float(np.sqrt(best_val)) * t_std,
            "world_size": world, "device": device.type, "steps": steps, "seconds": round(seconds, 3),
            "samples_per_s": round(epoch * n_train / seconds, 1),
        }
        write_json(out / "summary.json", summary)
        live.end()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def _bf16_compress_hook(_state, bucket):
    """All-reduce a gradient bucket as bfloat16 (half the bytes), averaged over ranks, like fp16_compress_hook."""
    compressed = bucket.buffer().to(torch.bfloat16).div_(dist.get_world_size())
    future = dist.all_reduce(compressed, async_op=True).get_future()

    def decompress(fut):
        out = bucket.buffer()
        out.copy_(fut.value()[0])
        return out

    return future.then(decompress)


def grad_sync(model: DDP, cfg):
    """Install train.grad_sync on a DDP model; returns the parameter averager of local SGD (else None)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if cfg.grad_sync == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif cfg.grad_sync == "bf16":  # torch's bf16 hook insists on NCCL; gloo all-reduces bfloat16 as well
        model.register_comm_hook(None, _bf16_compress_hook)
    elif cfg.grad_sync == "powersgd":
        # rank-1 compression with error feedback, after 10 exact warm-up steps
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=10,
                                            min_compression_rate=2)
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif cfg.grad_sync == "local_sgd":
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

        return PeriodicModelAverager(period=cfg.local_sgd_period, warmup_steps=0)
    return None


def save_checkpoint(path: Path, model, opt, sched, epoch: int, best_val: float, arch: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"arch": arch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "epoch": epoch, "best_val": best_val}, tmp)


def _spawned(rank: int, s: Settings, world: int, init_method: str) -> None:
    run_rank(s, rank, world, local_rank=rank, init_method=init_method)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_inputs(s: Settings) -> dict:
    cfg, feat_dir = s.train, Path(s.preprocess.out_dir)
    if not (feat_dir / "schema.json").exists():
        raise UserError(f"train: no features in {feat_dir}; run the preprocess stage first")
    schema = json.loads((feat_dir / "schema.json").read_text())
    n_train = schema["rows"]["train"]
    if cfg.batch_size > n_train:
        raise UserError(f"train.batch_size={cfg.batch_size} exceeds the {n_train:,} training rows; lower train.batch_size")
    if cfg.batch_size < cfg.world_size * cfg.grad_accum_steps:
        raise UserError(f"train.batch_size={cfg.batch_size} gives each of the {cfg.world_size} ranks fewer rows per step than "
                        f"train.grad_accum_steps={cfg.grad_accum_steps} micro-batches; raise train.batch_size or lower "
                        "train.grad_accum_steps")
    if cfg.batch_size < cfg.world_size:
        raise UserError(f"train.batch_size={cfg.batch_size} is smaller than train.world_size={cfg.world_size}: "
                        "every rank needs at least one row per batch; raise train.batch_size")
    if torch.cuda.is_available() and cfg.world_size > torch.cuda.device_count():
        raise UserError(f"train.world_size={cfg.world_size} exceeds the {torch.cuda.device_count()} GPUs here; lower it")
    return schema


def train(s: Settings) -> dict:
    cfg = s.train
    check_inputs(s)
    out = fresh_staging_dir(cfg.out_dir)
    if cfg.world_size == 1:
        run_rank(s, 0, 1, 0, init_method="")
    else:
        init = f"tcp://127.0.0.1:{_free_port()}"
        try:
            mp.spawn(_spawned, args=(s, cfg.world_size, init), nprocs=cfg.world_size, join=True)
        except mp.ProcessRaisedException as e:
            if "UserError: " in str(e):  # a user error in a rank: report it as such, without the traceback
                raise UserError(str(e).rsplit("UserError: ", 1)[1].strip()) from None
            raise
    summary = json.loads((out / "summary.json").read_text())
    replace_dir(out, cfg.out_dir)
    return summary


def torchrun_main(s: Settings) -> None:
    """Entry under torchrun: this process is one rank; rank 0 publishes the result."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    check_inputs(s)
    if rank == 0:
        fresh_staging_dir(s.train.out_dir)
    run_rank(s, rank, world, int(os.environ["LOCAL_RANK"]), init_method="env://")
    if rank == 0:
        replace_dir(staging_dir(s.train.out_dir), s.train.out_dir)


if __name__ == "__main__":
    cli(torchrun_main if "RANK" in os.environ else train)
