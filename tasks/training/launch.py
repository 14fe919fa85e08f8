"""Where the ranks of the train stage run (train.launcher); the training loop (tasks/training/loop.py) is the
same under all of them.

- local: train.world_size processes on this host (torch.multiprocessing), or the stage's own process when
  world_size is 1 and the strategy is ddp.
- dask: one rank per worker of the dask.address cluster that declares a GPU resource (launch_dask.py).
- torchrun: the stage runs `torchrun --standalone --nproc-per-node WORLD_SIZE -m tasks.train` on this host;
  for several nodes, start torchrun on every node yourself (docs: multi-node).
The launcher prepares the staging directory, relaunches the group from its last checkpoint after an
infrastructure failure (up to train.max_restarts), and publishes the model as train.out_dir when every rank
is done. Ranks in other processes report a classified error in the staging directory's `errors/`
(tasks/errors.py), so the launcher raises the same type wherever the rank ran.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from tasks.errors import InfrastructureError, RestartsExhausted, TrainflowError, UserError, record, recorded
from tasks.files import replace_dir, write_json
from tasks.settings import Settings, absolute_paths
from tasks.training.checkpoint import staging_dir
from tasks.training.data import check_inputs
from tasks.training.live import PROGRESS
from tasks.training.loop import run_rank
from tasks.training.progress import Progress
from tasks.training.watchdog import Watchdog

SETTINGS_ENV = "TRAINFLOW_SETTINGS"  # settings of ranks started by the stage's own torchrun (JSON file)
ERRORS_ENV = "TRAINFLOW_ERRORS"  # where such ranks record their classified errors


def launch(s: Settings, on_epoch=None) -> dict:
    """Run the ranks where train.launcher says, reporting their progress; relaunch the whole group from the last
    checkpoint after an infrastructure failure (a rank killed, a hang), up to train.max_restarts; publish the model."""
    cfg = s.train
    out = staging_dir(cfg.out_dir)  # kept between runs: an interrupted run resumes from its checkpoints
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    with Progress(out / PROGRESS, cfg.epochs, on_epoch):
        placement, failures = attempts(s, out)
    summary = json.loads((out / "summary.json").read_text())
    summary["launcher"], summary["placement"], summary["restarts"] = cfg.launcher, placement, failures
    write_json(out / "summary.json", summary)
    (out / PROGRESS).unlink(missing_ok=True)  # reported; the epochs are in summary.json
    shutil.rmtree(out / "errors", ignore_errors=True)
    replace_dir(out, cfg.out_dir)
    return summary


def attempts(s: Settings, out: Path) -> tuple[list[str], list[dict]]:
    """Launch the group until it finishes; the infrastructure failures it recovered from. User errors and bugs
    are not retried (they would fail again); infrastructure failures up to train.max_restarts times."""
    from tasks.training.launch_dask import on_dask

    cfg = s.train
    run = {"dask": on_dask, "torchrun": on_torchrun, "local": on_local}[cfg.launcher]
    failures: list[dict] = []
    while True:
        t0 = time.monotonic()
        shutil.rmtree(out / "errors", ignore_errors=True)
        try:
            return run(s, restart=bool(failures)), failures
        except InfrastructureError as e:
            failures.append(
                {
                    "attempt": len(failures) + 1,
                    "kind": "infrastructure",
                    "cause": str(e),
                    "seconds": round(time.monotonic() - t0, 1),
                }
            )
            if len(failures) > cfg.max_restarts:
                listed = "; ".join(f"#{x['attempt']} {x['kind']}: {x['cause']}" for x in failures)
                kept = f" The checkpoints are kept in {out / 'checkpoints'}." if (out / "checkpoints").exists() else ""
                raise RestartsExhausted(
                    f"train: gave up after {cfg.max_restarts} restart(s) (train.max_restarts): {listed}.{kept}"
                ) from None
            print(
                f"train: infrastructure failure ({e}); restarting the {cfg.world_size} rank(s) from the last checkpoint "
                f"(restart {len(failures)} of at most {cfg.max_restarts})",
                file=sys.stderr,
                flush=True,
            )


def exit_cause(who: str, code: int, step_timeout_s: float) -> str:
    """Why a rank's process ended: its hang watchdog, a signal (SIGKILL: most often the out-of-memory killer)."""
    if code == Watchdog.EXIT:
        return f"{who} hung (no step in train.step_timeout_s={step_timeout_s:g} s; stacks in the log)"
    if code < 0:
        name = signal.Signals(-code).name
        return f"{who} killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"{who} exited with code {code}"


def stacks_on_sigterm() -> None:
    """A rank that owns its process (local, torchrun) logs where it was when its launcher tears the group down
    (a peer died or hung). Not on a Dask worker: the handler would outlive the rank in the worker's process."""
    import faulthandler

    faulthandler.register(signal.SIGTERM, file=sys.stderr, all_threads=True, chain=True)


def reporting_errors(s: Settings, rank: int, errors: Path, *args, **kwargs) -> None:
    """run_rank in a process of its own: a classified error is recorded for the launcher, then raised."""
    try:
        run_rank(s, rank, *args, **kwargs)
    except TrainflowError as e:
        record(e, errors, rank)
        raise


# local -------------------------------------------------------------------------------------------------


def _spawned(rank: int, s: Settings, world: int, init_method: str, errors: Path) -> None:
    stacks_on_sigterm()
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # ranks of one host talk over loopback only
        os.environ.setdefault(var, "lo")
    reporting_errors(s, rank, errors, world, local_rank=rank, init_method=init_method)


def loopback_store(timeout_s: float):
    """A TCPStore for the ranks' rendezvous, hosted here and listening on 127.0.0.1 only (a store a rank
    hosts listens on every interface). Returns the store (keep it alive) and its init_method."""
    from datetime import timedelta

    import torch.distributed as dist

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        None,
        True,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=sock.detach(),
        use_libuv=False,
    )  # (only this backend takes a socket)
    return store, f"store://127.0.0.1:{port}"


def on_local(s: Settings, restart: bool = False) -> list[str]:
    cfg = s.train
    cuda = torch.cuda.is_available()
    available = torch.cuda.device_count() if cuda else os.cpu_count() or 1
    if cfg.world_size > available:
        what = "GPUs" if cuda else "CPU cores"
        raise UserError(
            f"train.world_size={cfg.world_size} exceeds the {available} {what} here (one rank each); lower "
            "train.world_size, or place ranks on more machines with train.launcher: dask or torchrun"
        )
    if cfg.world_size == 1 and cfg.strategy == "ddp":
        Watchdog.fired = False
        try:
            run_rank(s, 0, 1, 0, init_method="")  # no process group, no second process
        except KeyboardInterrupt:
            if not Watchdog.fired:
                raise
            raise InfrastructureError(exit_cause("rank 0", Watchdog.EXIT, cfg.step_timeout_s)) from None
        return ["this process"]
    import torch.multiprocessing as mp

    store, init = loopback_store(cfg.step_timeout_s + 60)
    errors = staging_dir(cfg.out_dir) / "errors"
    try:
        # when one rank fails, spawn terminates the others at once: no survivor waits on a collective
        mp.spawn(_spawned, args=(s, cfg.world_size, init, errors), nprocs=cfg.world_size, join=True)
    except mp.ProcessRaisedException:
        error = recorded(errors)
        if error is None:
            raise  # a bug: its traceback
        raise error from None
    except mp.ProcessExitedException as e:
        raise InfrastructureError(exit_cause(f"rank {e.error_index}", e.exit_code, cfg.step_timeout_s)) from None
    finally:
        del store
    return [f"local process {r}" for r in range(cfg.world_size)]


# torchrun ----------------------------------------------------------------------------------------------


def on_torchrun(s: Settings, restart: bool = False) -> list[str]:
    """torchrun on this host, train.world_size ranks; its ranks read these settings, not params.yaml."""
    errors = staging_dir(s.train.out_dir) / "errors"
    with tempfile.TemporaryDirectory(prefix="trainflow-torchrun-") as tmp:
        settings = Path(tmp) / "settings.json"
        settings.write_text(absolute_paths(s).model_dump_json(by_alias=True))
        env = dict(os.environ, **{SETTINGS_ENV: str(settings), ERRORS_ENV: str(errors)})
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            f"--nproc-per-node={s.train.world_size}",
            "-m",
            "tasks.train",
        ]
        proc = subprocess.run(cmd, env=env, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
    if not proc.returncode:
        return [f"torchrun local rank {r}" for r in range(s.train.world_size)]
    error = recorded(errors)  # what a rank that raised said (a survivor's failed collective, a user error)
    if isinstance(error, UserError):
        raise error
    # torchrun's report names the first rank to fail and its exit code: the cause, when a rank was killed or hung
    root = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", proc.stderr, re.S)
    if root and (int(root[2]) < 0 or int(root[2]) == Watchdog.EXIT):
        raise InfrastructureError(exit_cause(f"torchrun rank {root[1]}", int(root[2]), s.train.step_timeout_s))
    if error is not None:
        raise error
    sys.stderr.write(proc.stderr)
    raise RuntimeError(f"torchrun exited with {proc.returncode}: {' '.join(cmd)} (its output is above)")


def torchrun_rank(s: Settings) -> None:
    """This process is one rank started by torchrun: by the stage (on_torchrun), or by hand on each node.
    Started by hand, rank 0 prepares the staging directory, reports progress and publishes the model when all
    ranks are done."""
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    by_stage = SETTINGS_ENV in os.environ
    stacks_on_sigterm()
    if by_stage:
        s = Settings.model_validate_json(Path(os.environ[SETTINGS_ENV]).read_text())
    errors = Path(os.environ.get(ERRORS_ENV) or staging_dir(s.train.out_dir) / "errors")
    try:
        if world != s.train.world_size:
            raise UserError(
                f"torchrun started {world} ranks but train.world_size is {s.train.world_size}; set "
                "train.world_size to nnodes × nproc-per-node"
            )
        if not by_stage and rank == 0:
            check_inputs(s)
            staging_dir(s.train.out_dir).mkdir(parents=True, exist_ok=True)  # checkpoints of an interrupted run stay
    except UserError as e:
        record(e, errors, rank)
        raise
    reporting = not by_stage and rank == 0  # (started by the stage, the stage reports)
    with Progress(staging_dir(s.train.out_dir) / PROGRESS, s.train.epochs) if reporting else nullcontext():
        reporting_errors(
            s, rank, errors, world, local, init_method="env://", local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world))
        )
    if reporting:
        (staging_dir(s.train.out_dir) / PROGRESS).unlink(missing_ok=True)
        replace_dir(staging_dir(s.train.out_dir), s.train.out_dir)
