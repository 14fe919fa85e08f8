"""Train the model with PyTorch DDP or FSDP.  Run: python -m tasks.train  (or under torchrun)

Every rank draws the same per-epoch permutation and takes its own slice of each global batch, and its loss
is scaled so that the gradient average over ranks equals the mean over the whole global batch: k steps on
N ranks give the parameters of k steps in one process. Where the ranks run is train.launcher's business
(tasks/launch.py); this module is the same training loop under all of them. Rank 0 alone logs (dvclive) and
writes files, into a staging directory that replaces `train.out_dir` only when training finishes, so a
failed run never touches the previous model.

Per epoch, the step time of every rank is split into data (taking the batch), compute (forward, backward,
optimizer) and sync (gradient communication not hidden behind the backward pass), measured with CUDA
events on GPU and the host clock on CPU (no host sync per step), and averaged over ranks.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from tasks import checkpoint
from tasks.files import atomic_path, write_json
from tasks.model import build_model, shard_units
from tasks.settings import Settings, UserError, cli

EVAL_CHUNK = 65536


def load_split(directory: Path, features: list[str], target: str) -> tuple[torch.Tensor, torch.Tensor]:
    names = set(pq.read_schema(next(iter(sorted(Path(directory).glob("*.parquet"))), directory)
                               if Path(directory).is_dir() else directory).names)
    missing = [c for c in features + [target] if c not in names]
    if missing:
        raise UserError(f"{directory} lacks the columns {missing} that the model expects: the features and the model "
                        "come from different runs; rerun the preprocess and train stages (dvc repro)")
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


def check_features(schema: dict, x: torch.Tensor) -> None:
    """The model built from the feature metadata must fit the features: every categorical column's codes must
    index its embedding table (an out-of-range code is a cryptic device-side assert on GPU)."""
    for c in schema.get("categorical", []):
        if not 0 <= c["index"] < x.shape[1]:
            raise UserError(f"schema.json gives categorical column {c.get('name')!r} index {c['index']}, but the features "
                            f"have {x.shape[1]} columns; rerun the preprocess stage")
        codes = x[:, c["index"]]
        top = float(codes.max()) if len(codes) else 0.0
        if top >= c["cardinality"] or float(codes.min()) < 0 or not torch.equal(codes, codes.round()):
            raise UserError(f"feature {c.get('name')!r} holds code {top:g}, but schema.json gives it {c['cardinality']} "
                            "categories (codes 0..cardinality-1): the features and their metadata disagree; rerun the "
                            "preprocess stage")


def run_rank(s: Settings, rank: int, world: int, local_rank: int, init_method: str, local_world: int | None = None,
             log: bool = True) -> None:
    """One rank of a training run. init_method "" means one process and no process group; "store://HOST:PORT" a
    store the launcher hosts (this rank connects as a client and listens on nothing itself)."""
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if init_method:
        # a collective waits on a dead or hung peer a little longer than the watchdog (which logs the stacks)
        timeout = timedelta(seconds=s.train.step_timeout_s + 60)
        where: dict = {"init_method": init_method}
        if init_method.startswith("store://"):
            host, port = init_method.removeprefix("store://").rsplit(":", 1)
            where = {"store": dist.TCPStore(host, int(port), world, is_master=False, timeout=timeout)}
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timeout, **where,
                                **({"device_id": device} if cuda else {}))
    try:
        _train(s, rank, world, device, grouped=bool(init_method), local_world=local_world or world, log=log)
    finally:
        if init_method and dist.is_initialized():
            dist.destroy_process_group()


def _train(s: Settings, rank: int, world: int, device: torch.device, grouped: bool, local_world: int, log: bool) -> None:
    cfg, feat_dir = s.train, Path(s.preprocess.out_dir)
    fsdp = cfg.strategy == "fsdp"
    ddp = grouped and not fsdp
    cuda = device.type == "cuda"
    master = rank == 0
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    torch.manual_seed(cfg.seed)
    out = staging_dir(cfg.out_dir)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    # data: whole splits on the device as tensors (pinned, copied once); batches are index slices
    schema = json.loads((feat_dir / "schema.json").read_text())
    transform = json.loads((feat_dir / "transform.json").read_text())
    features, target = schema["features"], schema["target"]
    x_train, y_train = load_split(feat_dir / "train", features, target)
    x_val, y_val = load_split(feat_dir / "val", features, target)
    check_features(schema, x_train)
    t_mean, t_std = transform["target_mean"], transform["target_std"]
    y_train, y_val = (y_train - t_mean) / t_std, (y_val - t_mean) / t_std
    if cuda:
        x_train, y_train, x_val, y_val = (t.pin_memory().to(device, non_blocking=True) for t in (x_train, y_train, x_val, y_val))
    n_train, B = len(x_train), cfg.batch_size

    # model, optimizer, schedule
    arch = {"model": cfg.model, "n_features": len(features), "hidden": list(cfg.hidden), "dropout": cfg.dropout,
            "categorical": schema.get("categorical", [])}
    raw_model = build_model(arch).to(device)
    clock = Clock(device)
    sync = SyncTimer(clock)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # the model's output is a view (squeeze); nothing here modifies it in place, which is what FSDP warns of
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for unit in shard_units(raw_model):
            fully_shard(unit)
        model = fully_shard(raw_model)
    elif ddp:
        model = DDP(raw_model, device_ids=[device.index] if cuda else None)
    else:
        model = raw_model
    averager = grad_sync(model, cfg, sync) if ddp else None
    local_sgd = ddp and cfg.grad_sync == "local_sgd"
    # one process on a GPU: CUDA graphs too (a small model's step is otherwise bound by kernel launches)
    forward = torch.compile(model, mode="reduce-overhead" if cuda and not grouped else None) if cfg.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)  # one kernel per step
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    order = torch.Generator().manual_seed(cfg.seed)  # same data order on every rank

    def accumulating(quiet: bool):
        """Gradients of this micro-batch stay local (synced with the last one; never, with local SGD)."""
        if fsdp:
            model.set_requires_gradient_sync(not quiet)
        return model.no_sync() if ddp and quiet else nullcontext()

    # resume: an interrupted run of the same settings and features continues from its last valid checkpoint
    ckpt_dir = out / "checkpoints"
    run_id = checkpoint.fingerprint(cfg.model_dump(), {"schema": schema, "transform": transform})
    state = checkpoint.load_from(cfg.resume_from, arch) if cfg.resume_from else checkpoint.load_latest(ckpt_dir, run_id)
    every, unit = int(cfg.checkpoint_every.split()[0]), cfg.checkpoint_every.split()[1].rstrip("s")
    best_val, best_epoch, best_state, stale, history = float("inf"), -1, None, 0, []
    first_epoch, skip, steps = 1, 0, 0
    if state is not None:
        set_full_state(model, opt, fsdp, state["model"], state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        order.set_state(state["order_state"])
        first_epoch, skip, steps = state["epoch"], state["step_in_epoch"], state["steps"]
        b = state["best"]
        best_val, best_epoch, best_state, stale, history = b["val"], b["epoch"], b["state"], b["stale"], list(state["history"])
        set_rng(state["rng"], rank, world, device)
        if master:
            print(f"train: resuming from {state['path']} (epoch {first_epoch}, step {skip} of it, {steps} steps done)", flush=True)

    def snapshot(epoch: int, step_in_epoch: int, order_state: torch.Tensor, partial: list[float]) -> dict | None:
        """The checkpoint contract's state (gathered on every rank; rank 0 gets it, the others None)."""
        model_state, optim_state = full_checkpoint(model, opt, fsdp) if master or fsdp else (None, None)
        rngs = gathered(rng_state(device), world, grouped)
        if not master:
            return None
        return {"fingerprint": run_id, "arch": arch, "model": model_state, "optimizer": optim_state,
                "scheduler": copy.deepcopy(sched.state_dict()), "epoch": epoch, "step_in_epoch": step_in_epoch,
                "steps": steps, "order_state": order_state.clone(), "rng": rngs, "partial_sse": partial,
                "best": {"val": best_val, "epoch": best_epoch, "state": best_state, "stale": stale},
                "history": copy.deepcopy(history)}

    live = None
    if master and log:
        from dvclive import Live

        if state is not None:
            trim_live(Path(cfg.log_dir), len(history))
        live = Live(dir=cfg.log_dir, dvcyaml=False, save_dvc_exp=False, resume=state is not None)
    if state is None and master:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # another run's checkpoints (other settings or features)
    if grouped:
        dist.barrier()  # every rank has read the checkpoints before any is removed or written
    watchdog = Watchdog(cfg.step_timeout_s, rank, in_process=not grouped and not os.environ.get("RANK"),
                        dump_to=out / f"hung-rank{rank}.log")
    resumed_at = time.time()  # training (re)starts here: with a fault's time, the time to recover
    t0, rows_done = time.perf_counter(), 0
    # rank 0's writes (metrics, checkpoints) run in one background thread, in order
    writer, writes = ThreadPoolExecutor(1, thread_name_prefix="trainflow-writer"), []
    try:
        steps_per_epoch = math.ceil(n_train / B)
        epoch = first_epoch - 1
        for epoch in range(first_epoch, cfg.epochs + 1):
            # one pass over the train set: rank r takes the r-th slice of every global batch
            epoch_t0 = time.perf_counter()
            model.train()
            epoch_order = order.get_state()  # with the position in the epoch, the data-order state
            perm = torch.randperm(n_train, generator=order).to(device)
            step_sse = torch.zeros(steps_per_epoch, device=device)  # this rank's squared error per step: no host sync
            if skip and state is not None and state.get("partial_sse") is not None:
                step_sse[:skip] = resumed_sse(state["partial_sse"], rank, world)
            marks, previous = [], clock.now()
            for i, start in enumerate(range(0, n_train, B)):
                if i < skip:  # done before the interruption: the same batches, not trained again
                    continue
                inject_fault(rank, steps)
                idx = perm[start:start + B]
                m = len(idx)
                mine = rank_slice(idx, rank, world)
                parts = mine.tensor_split(cfg.grad_accum_steps) if cfg.grad_accum_steps > 1 else (mine,)
                micro = [(x_train[part], y_train[part]) for part in parts]
                taken = clock.now()
                opt.zero_grad(set_to_none=True)
                for k, (xb, yb) in enumerate(micro):
                    with accumulating(local_sgd or k < len(micro) - 1):
                        with autocast:
                            predicted = forward(xb)
                        sq = (predicted.float() - yb).pow(2).sum()
                        (sq * (world / m)).backward()  # ranks average gradients -> the mean over the global batch
                    step_sse[i] += sq.detach()
                opt.step()
                if averager is not None:
                    sync.ready = clock.now()
                    averager.average_parameters(model.parameters())
                    sync.done = clock.now()
                end = clock.now()
                marks.append((previous, taken, *sync.take(), end))
                previous = end
                steps, rows_done = steps + 1, rows_done + m
                watchdog.beat()
                if unit == "step" and steps % every == 0 and i + 1 < steps_per_epoch:  # (an epoch's end is saved below)
                    # every rank's squared errors so far: a resumed epoch reports the same loss
                    partial = gathered(step_sse[:i + 1].double().cpu().tolist(), world, grouped)
                    snap = snapshot(epoch, i + 1, epoch_order, partial)
                    if master:
                        writes.append(writer.submit(checkpoint.save, ckpt_dir, snap, cfg.keep_checkpoints))
            skip = 0
            sched.step()

            # validation: each rank scores its shard in the same number of chunks (FSDP needs every rank in
            # every forward); sums and step times are all-reduced: one collective, one host sync per epoch
            model.eval()
            with torch.no_grad(), autocast:
                shard = torch.arange(rank, len(x_val), world, device=device)
                chunks = max(1, math.ceil(math.ceil(len(x_val) / world) / EVAL_CHUNK))
                val_sse = sum(((model(x_val[c]).float() - y_val[c]).pow(2).sum() for c in shard.tensor_split(chunks)),
                              torch.zeros((), device=device))
            if cuda:
                torch.cuda.synchronize(device)
            watchdog.beat()
            timing = step_times(clock, marks)
            totals = torch.tensor([float(step_sse.sum()), float(val_sse), timing["data"], timing["compute"], timing["sync"],
                                   timing["train"]], dtype=torch.float64, device=device)
            if grouped:
                dist.all_reduce(totals)
            totals[2:] /= world  # step times: the mean over ranks
            train_mse, val_mse = totals[0].item() / n_train, totals[1].item() / len(x_val)
            if not np.isfinite(train_mse):
                bad = ~torch.isfinite(step_sse)
                mine_first = torch.tensor(steps - steps_per_epoch + int(bad.nonzero()[0]) + 1 if bad.any() else -1, device=device)
                firsts = [torch.zeros_like(mine_first) for _ in range(world)] if grouped else [mine_first]
                if grouped:
                    dist.all_gather(firsts, mine_first)
                step, where = min((int(b), r) for r, b in enumerate(firsts) if int(b) >= 0)
                kept = f"; the checkpoints before it are in {ckpt_dir}" if checkpoint.listed(ckpt_dir) or writes else ""
                raise UserError(f"train: loss became {train_mse} at step {step} (epoch {epoch}) on rank {where}{kept}; "
                                f"{cfg.out_dir} keeps the last good model. Lower train.lr (now {cfg.lr})")

            # early stopping and checkpoints (every rank takes the same decision; rank 0 writes)
            improved = val_mse < best_val
            if improved:
                best_val, best_epoch, stale = val_mse, epoch, 0
                best_state = full_model_state(model, fsdp)
            else:
                stale += 1
            step_s = totals[5].item()
            record = {"epoch": epoch, "train_loss": train_mse, "val_loss": val_mse, "val_rmse": float(np.sqrt(val_mse)) * t_std,
                      "lr": sched.get_last_lr()[0], "samples_per_s": n_train / step_s if step_s > 0 else None,
                      "data_s": totals[2].item(), "compute_s": totals[3].item(), "sync_s": totals[4].item() if grouped and not fsdp else None,
                      "seconds": time.perf_counter() - epoch_t0}
            history.append(record)
            if master:
                writes.append(writer.submit(log_epoch, live, record, out / PROGRESS))
            if unit == "step" or epoch % every == 0 or stale >= cfg.patience or epoch == cfg.epochs:
                snap = snapshot(epoch + 1, 0, order.get_state(), None)  # (a copy: training goes on while it is written)
                if master:
                    writes.append(writer.submit(checkpoint.save, ckpt_dir, snap, cfg.keep_checkpoints))
            if stale >= cfg.patience:
                break
    finally:
        watchdog.stop()
        writer.shutdown(wait=True)  # every checkpoint a message may mention is on disk
    for write in writes:
        write.result()  # a failed write fails the run
    seconds = time.perf_counter() - t0
    if master:
        with atomic_path(out / "model.pt") as tmp:
            torch.save({"arch": arch, "model": best_state, "features": features, "target": target,
                        "target_mean": t_mean, "target_std": t_std}, tmp)
        summary = {
            "best_epoch": best_epoch, "epochs_run": epoch, "best_val_rmse": float(np.sqrt(best_val)) * t_std,
            "world_size": world, "device": device.type, "strategy": cfg.strategy, "precision": "bf16" if bf16 else "fp32",
            "steps": steps, "seconds": round(seconds, 3), "samples_per_s": round(rows_done / seconds, 1),
            "resumed_from": None if state is None else {"checkpoint": state["path"], "epoch": first_epoch, "step_in_epoch": state["step_in_epoch"],
                                                        "steps": state["steps"], "at": resumed_at},
            "time_split_s": {k: round(sum(h[f"{k}_s"] or 0.0 for h in history), 4) for k in ("data", "compute", "sync")},
            "epochs": history,
        }
        if cuda:
            summary["gpu_peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        write_json(out / "summary.json", summary)
        if live is not None:
            live.end()
    if grouped:
        dist.barrier()


def trim_live(log_dir: Path, epochs: int) -> None:
    """Drop the dvclive rows of epochs after the checkpoint being resumed (they are trained and logged again),
    and what a killed process left half-written, so no epoch is logged twice."""
    for tsv in (log_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        header = lines[0].split("\t") if lines else []
        if "step" not in header:  # empty or cut in its header: dvclive writes it anew
            tsv.unlink()
            continue
        column = header.index("step")
        kept = [r for r in lines[1:] if _logged_before(r, len(header), column, epochs)]
        if len(kept) < len(lines) - 1:
            with atomic_path(tsv) as tmp:
                Path(tmp).write_text("\n".join([lines[0], *kept]) + "\n")


def _logged_before(row: str, fields: int, column: int, epochs: int) -> bool:
    values = row.split("\t")
    try:
        return len(values) == fields and int(values[column]) <= epochs and all(v != "" for v in values)
    except ValueError:
        return False


def log_epoch(live, record: dict, progress: Path) -> None:
    """Rank 0's record of an epoch (in the writer thread): a line for the launcher's progress report
    (tasks/progress.py, whichever machine the rank runs on), and the dvclive metrics."""
    with open(progress, "a") as f:
        f.write(json.dumps(record) + "\n")
    if live is None:
        return
    live.step = record["epoch"]  # the plots' x axis is the epoch, counted from 1 as everywhere else
    for key, value in LIVE_KEYS:
        if record[value] is not None:
            live.log_metric(key, record[value])
    live.next_step()


class Watchdog:
    """A rank that makes no progress (a step, a validation) for timeout_s seconds is hung: dump every
    thread's Python stack to stderr (the run's log) and end the process, so the launcher tears the group
    down and restarts it from the last checkpoint."""

    EXIT = 86  # the exit code that says "hung", for the launcher
    fired = False  # in-process (one rank in the stage's own process): the main thread is interrupted instead

    def __init__(self, timeout_s: float, rank: int, in_process: bool, dump_to: Path | None = None):
        import threading

        self.timeout, self.rank, self.last, self.in_process = timeout_s, rank, time.monotonic(), in_process
        self.dump_to = dump_to  # the stacks also go here: a Dask worker's stderr is on another machine
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="trainflow-watchdog", daemon=True)
        self.thread.start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        import faulthandler
        import sys

        while not self.stopped.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout:
                print(f"train: rank {self.rank} finished no step in {idle:.0f} s (train.step_timeout_s={self.timeout:g}): "
                      "hung. Its Python stacks:", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                try:
                    with open(self.dump_to, "w") as f:
                        f.write(f"rank {self.rank} finished no step in {idle:.0f} s (train.step_timeout_s={self.timeout:g})\n")
                        f.flush()
                        faulthandler.dump_traceback(file=f, all_threads=True)
                except (OSError, TypeError):  # no file to write to: stderr has the stacks
                    pass
                if self.in_process:
                    import _thread

                    Watchdog.fired = True
                    _thread.interrupt_main()
                    return
                os._exit(self.EXIT)


FAULT_ENV = "TRAINFLOW_INJECT_FAULT"  # tests only: "kill|hang:RANK:STEP:MARKER_FILE", fired once (the marker)


def inject_fault(rank: int, steps: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, r, step, marker = spec.split(":", 3)
    if int(r) == rank and int(step) == steps and not os.path.exists(marker):
        Path(marker).write_text(f"{kind} rank {rank} at step {steps}\n")
        if kind == "kill":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10**6)  # hang


def rng_state(device: torch.device) -> dict:
    import random

    npk = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [npk[0], torch.from_numpy(npk[1].astype(np.int64)), int(npk[2]), int(npk[3]), float(npk[4])],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def gathered(mine, world: int, grouped: bool) -> list:
    """Every rank's `mine` (plain values and CPU tensors), in rank order: a collective between this run's own ranks."""
    if not grouped:
        return [mine]
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    return everyone


def set_rng(states: list[dict], rank: int, world: int, device: torch.device) -> None:
    import random

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


def resumed_sse(partial: list[list[float]], rank: int, world: int) -> torch.Tensor:
    """This rank's share of the squared errors of the steps done before the interruption: its own, or, after
    an elastic relaunch on another number of ranks, all of them on rank 0 (the epoch's sum is what counts)."""
    if len(partial) == world:
        return torch.tensor(partial[rank])
    return torch.tensor(partial).sum(0) if rank == 0 else torch.zeros(len(partial[0]))


def set_full_state(model, opt, fsdp: bool, model_state: dict, optim_state: dict) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        return
    raw = unwrapped(model)
    raw.load_state_dict(model_state)
    opt.load_state_dict(optim_state)


def unwrapped(model):
    return model.module if isinstance(model, DDP) else model


def rank_slice(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank r's part of a global batch: contiguous, sizes differing by at most one, together the whole batch."""
    m = len(batch)
    return batch[rank * m // world:(rank + 1) * m // world]


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


def _bf16_compress_hook(_state, bucket):
    """All-reduce a gradient bucket as bfloat16 (half the bytes), averaged over ranks, like fp16_compress_hook."""
    compressed = bucket.buffer().to(torch.bfloat16).div_(dist.get_world_size())
    future = dist.all_reduce(compressed, async_op=True).get_future()

    def decompress(fut):
        out = bucket.buffer()
        out.copy_(fut.value()[0])
        return out

    return future.then(decompress)


def grad_sync(model: DDP, cfg, timer: SyncTimer):
    """Install train.grad_sync on a DDP model (timed); returns the parameter averager of local SGD (else None)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if cfg.grad_sync == "local_sgd":
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

        return PeriodicModelAverager(period=cfg.local_sgd_period, warmup_steps=0)
    state, hook = None, default_hooks.allreduce_hook
    if cfg.grad_sync == "fp16":
        hook = default_hooks.fp16_compress_hook
    elif cfg.grad_sync == "bf16":  # torch's bf16 hook insists on NCCL; gloo all-reduces bfloat16 as well
        hook = _bf16_compress_hook
    elif cfg.grad_sync == "powersgd":
        # rank-1 compression with error feedback, after 10 exact warm-up steps
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=10,
                                            min_compression_rate=2)
        hook = powerSGD_hook.powerSGD_hook
    model.register_comm_hook(state, timer.wrap(hook))
    return None


# what dvclive logs (dvc metrics show / plots): losses, the validation metric, the LR and speed; the step time's
# split per epoch is in summary.json and the flow's training-epochs artifact
LIVE_KEYS = (("train/loss", "train_loss"), ("val/loss", "val_loss"), ("val/rmse", "val_rmse"), ("lr", "lr"),
             ("perf/samples_per_s", "samples_per_s"))
PROGRESS = "progress.jsonl"


def check_inputs(s: Settings) -> dict:
    cfg, feat_dir = s.train, Path(s.preprocess.out_dir)
    if not (feat_dir / "schema.json").exists():
        raise UserError(f"train: no features in {feat_dir}; run the preprocess stage first")
    schema = json.loads((feat_dir / "schema.json").read_text())
    n_train = schema["rows"]["train"]
    if cfg.batch_size > n_train:
        raise UserError(f"train.batch_size={cfg.batch_size} exceeds the {n_train:,} training rows; lower train.batch_size")
    check_model_fits(cfg, schema)
    if cfg.batch_size < cfg.world_size * cfg.grad_accum_steps:
        raise UserError(f"train.batch_size={cfg.batch_size} gives each of the {cfg.world_size} ranks fewer rows per step than "
                        f"train.grad_accum_steps={cfg.grad_accum_steps} micro-batches; raise train.batch_size or lower "
                        "train.grad_accum_steps")
    return schema


def check_model_fits(cfg, schema: dict) -> None:
    """Refuse a model whose training state cannot fit this machine (before any rank starts), rather than a
    crash deep in a rank. The state is ~6 copies of the weights: weights, gradients, AdamW's two moments, the
    best model kept for early stopping and a checkpoint snapshot; every local rank holds it (FSDP: a share)."""
    if cfg.launcher != "local":
        return  # the ranks run on other machines (dask) or were sized by whoever started torchrun
    arch = {"model": cfg.model, "n_features": schema["n_features"], "hidden": list(cfg.hidden), "dropout": cfg.dropout,
            "categorical": schema.get("categorical", [])}
    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(arch).parameters())
    need = 6 * 4 * n * (1 if cfg.strategy == "fsdp" else cfg.world_size)
    if torch.cuda.is_available():
        have, where = torch.cuda.get_device_properties(0).total_memory, "GPU memory per device"
        need //= cfg.world_size
    else:
        import psutil  # a dependency of DVC

        have, where = psutil.virtual_memory().available, "memory available here"
    if need > have:
        raise UserError(f"train.hidden={list(cfg.hidden)} makes a {cfg.model} of {n:,} parameters, about {need / 2**30:,.1f} GiB "
                        f"to train ({cfg.world_size} rank(s): weights, gradients, AdamW state, copies), more than the "
                        f"{have / 2**30:,.1f} GiB of {where}; lower train.hidden")


def train(s: Settings, on_epoch=None) -> dict:
    """Train on the features of the preprocess stage, reporting each epoch (and to `on_epoch(record)`); returns
    the run's summary."""
    from tasks import launch

    check_inputs(s)
    return launch.launch(s, on_epoch)


if __name__ == "__main__":
    from tasks import launch

    cli(launch.torchrun_rank if "RANK" in os.environ else train)
