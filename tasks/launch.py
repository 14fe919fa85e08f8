"""Where the ranks of the train stage run (train.launcher); the training loop is tasks.train.run_rank under all.

- local: train.world_size processes on this host (torch.multiprocessing), or the stage's own process when
  world_size is 1 and the strategy is ddp.
- dask: one rank per worker of the dask.address cluster that declares a GPU resource (`dask worker ADDRESS
  --resources GPU=1`; with dask-cuda, `dask cuda worker ADDRESS --resources GPU=1` pins each worker to its
  GPU). Rank 0's worker gives its host and a free port for the rendezvous. Workers read the features and
  rank 0 writes the model at the same absolute paths as this process: a filesystem shared with them.
- torchrun: the stage runs `torchrun --standalone --nproc-per-node WORLD_SIZE -m tasks.train` on this host;
  for several nodes, start torchrun on every node yourself (README: multi-node).
The launcher prepares the staging directory and publishes it as train.out_dir when every rank is done.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import urlparse

import torch

from tasks.cluster import cluster_workers
from tasks.files import replace_dir, write_json
from tasks.settings import Settings, UserError, absolute_paths
from tasks.progress import Progress
from tasks.train import PROGRESS, Watchdog, check_inputs, run_rank, staging_dir

SETTINGS_ENV = "TRAINFLOW_SETTINGS"  # settings of ranks started by the stage's own torchrun (JSON file)
ERROR_ENV = "TRAINFLOW_ERROR_FILE"   # where such a rank leaves a user error for the stage to report


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
    replace_dir(out, cfg.out_dir)
    return summary


def attempts(s: Settings, out: Path) -> tuple[list[str], list[dict]]:
    """Launch the group until it finishes; the infrastructure failures it recovered from."""
    cfg = s.train
    run = {"dask": on_dask, "torchrun": on_torchrun, "local": on_local}[cfg.launcher]
    failures: list[dict] = []
    while True:
        t0 = time.monotonic()
        try:
            placement = run(s, restart=bool(failures))
            break
        except Failure as f:
            failures.append({"attempt": len(failures) + 1, "kind": f.kind, "cause": f.cause,
                             "seconds": round(time.monotonic() - t0, 1)})
            if f.kind != "infrastructure" or len(failures) > cfg.max_restarts:
                listed = "; ".join(f"#{x['attempt']} {x['kind']}: {x['cause']}" for x in failures)
                kept = f" The checkpoints are kept in {out / 'checkpoints'}." if (out / "checkpoints").exists() else ""
                if f.kind == "infrastructure":
                    raise UserError(f"train: gave up after {cfg.max_restarts} restart(s) (train.max_restarts): {listed}.{kept}") from None
                raise f.error from None  # user errors and bugs are not retried
            print(f"train: {f.kind} failure ({f.cause}); restarting the {cfg.world_size} rank(s) from the last checkpoint "
                  f"(restart {len(failures)} of at most {cfg.max_restarts})", file=sys.stderr, flush=True)
    return placement, failures


class Failure(Exception):
    """A failed attempt, classified: user (bad data or params: never retried), infrastructure (a rank killed
    by a signal or out of memory, a hang, a lost worker: retried), bug (a traceback in our code: not retried)."""

    def __init__(self, kind: str, cause: str, error: BaseException):
        super().__init__(cause)
        self.kind, self.cause, self.error = kind, cause, error


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def exit_cause(who: str, code: int, step_timeout_s: float) -> str:
    """Why a rank's process ended: its hang watchdog, a signal (SIGKILL: most often the out-of-memory killer)."""
    import signal

    if code == Watchdog.EXIT:
        return f"{who} hung (no step in train.step_timeout_s={step_timeout_s:g} s; stacks in the log)"
    if code < 0:
        name = signal.Signals(-code).name
        return f"{who} killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"{who} exited with code {code}"


def _user_error_from(text: str) -> UserError | None:
    return UserError(text.rsplit("UserError: ", 1)[1].strip()) if "UserError: " in text else None


# local -------------------------------------------------------------------------------------------------

def stacks_on_sigterm() -> None:
    """A rank that owns its process (local, torchrun) logs where it was when its launcher tears the group down
    (a peer died or hung). Not on a Dask worker: the handler would outlive the rank in the worker's process."""
    import faulthandler
    import signal

    faulthandler.register(signal.SIGTERM, file=sys.stderr, all_threads=True, chain=True)


def _spawned(rank: int, s: Settings, world: int, init_method: str) -> None:
    stacks_on_sigterm()
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # ranks of one host talk over loopback only
        os.environ.setdefault(var, "lo")
    run_rank(s, rank, world, local_rank=rank, init_method=init_method)


def loopback_store(timeout_s: float):
    """A TCPStore for the ranks' rendezvous, hosted here and listening on 127.0.0.1 only (a store a rank
    hosts listens on every interface). Returns the store (keep it alive) and its init_method."""
    from datetime import timedelta

    import torch.distributed as dist

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, None, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False,
                          master_listen_fd=sock.detach(), use_libuv=False)  # (only this backend takes a socket)
    return store, f"store://127.0.0.1:{port}"


def on_local(s: Settings, restart: bool = False) -> list[str]:
    cfg = s.train
    cuda = torch.cuda.is_available()
    available = torch.cuda.device_count() if cuda else os.cpu_count() or 1
    if cfg.world_size > available:
        what = "GPUs" if cuda else "CPU cores"
        raise UserError(f"train.world_size={cfg.world_size} exceeds the {available} {what} here (one rank each); lower "
                        "train.world_size, or place ranks on more machines with train.launcher: dask or torchrun")
    if cfg.world_size == 1 and cfg.strategy == "ddp":
        Watchdog.fired = False
        try:
            run_rank(s, 0, 1, 0, init_method="")  # no process group, no second process
        except KeyboardInterrupt as e:
            if not Watchdog.fired:
                raise
            raise Failure("infrastructure", exit_cause("rank 0", Watchdog.EXIT, cfg.step_timeout_s), e) from None
        except UserError as e:
            raise Failure("user", str(e), e) from None
        return ["this process"]
    import torch.multiprocessing as mp

    store, init = loopback_store(cfg.step_timeout_s + 60)
    try:
        # when one rank fails, spawn terminates the others at once: no survivor waits on a collective
        mp.spawn(_spawned, args=(s, cfg.world_size, init), nprocs=cfg.world_size, join=True)
    except mp.ProcessRaisedException as e:
        user = _user_error_from(str(e))
        raise Failure("user", str(user), user) if user else Failure("bug", str(e).strip().splitlines()[-1], e) from None
    except mp.ProcessExitedException as e:
        raise Failure("infrastructure", exit_cause(f"rank {e.error_index}", e.exit_code, cfg.step_timeout_s), e) from None
    finally:
        del store
    return [f"local process {r}" for r in range(cfg.world_size)]


# dask --------------------------------------------------------------------------------------------------

def gpu_workers(workers: dict) -> list[str]:
    """Addresses of the workers that declare a GPU resource, grouped by host, in a stable order."""
    gpu = [a for a, w in workers.items() if w.get("resources", {}).get("GPU", 0) >= 1]
    return sorted(gpu, key=lambda a: (urlparse(a).hostname or "", a))


def _dask_rank(s: Settings, rank: int, world: int, local_rank: int, local_world: int, init_method: str) -> str:
    run_rank(s, rank, world, local_rank, init_method, local_world=local_world)
    return socket.gethostname()


def on_dask(s: Settings, restart: bool = False) -> list[str]:
    import dask
    from distributed import Client

    cfg = s.train
    address = s.dask.address if s.dask.address != "local" else dask.config.get("scheduler-address", None)
    try:
        client = Client(address, timeout=10)
    except (OSError, TimeoutError) as e:
        raise UserError(f"train.launcher=dask: no Dask scheduler answers at {address} ({e}); start it (dask scheduler) "
                        "or fix dask.address") from None
    with client:
        workers = _rank_workers(client, cfg, address, restart)
        world = len(workers)
        s = absolute_paths(s)
        schema = str(Path(s.preprocess.out_dir) / "schema.json")
        blind = [w for w, seen in client.run(os.path.exists, schema, workers=workers).items() if not seen]
        if blind:
            raise UserError(f"Dask workers {blind} cannot read {schema}: the dask launcher needs the workspace on a "
                            "filesystem the workers share, at the same path")
        hosts = [urlparse(w).hostname for w in workers]
        per_host, seen = Counter(hosts), Counter()
        local_ranks = []
        for h in hosts:
            local_ranks.append(seen[h])
            seen[h] += 1
        port = client.run(free_port, "", workers=[workers[0]])[workers[0]]
        init = f"tcp://{hosts[0]}:{port}"
        run = uuid.uuid4().hex[:8]
        futures = [client.submit(_dask_rank, s, r, world, local_ranks[r], per_host[hosts[r]], init,
                                 key=f"trainflow-train-rank{r}-{run}", workers=[w], resources={"GPU": 1}, pure=False,
                                 allow_other_workers=False)
                   for r, w in enumerate(workers)]
        _watch(client, futures, workers, staging_dir(cfg.out_dir))
    return workers


def _rank_workers(client, cfg, address: str, restart: bool) -> list[str]:
    """The GPU workers that take the ranks. A relaunch waits up to train.rejoin_timeout_s for replacements of
    lost workers; with train.elastic, any attempt then goes on with the GPU workers there are (at least one),
    and without it a first attempt with too few is refused at once."""
    def available() -> tuple[list[str], int]:
        workers = cluster_workers(client)
        return gpu_workers(workers), len(workers)

    workers, n_all = available()
    deadline = time.monotonic() + cfg.rejoin_timeout_s
    while (restart or cfg.elastic) and len(workers) < cfg.world_size and time.monotonic() < deadline:
        time.sleep(0.5)
        workers, n_all = available()
    if len(workers) >= cfg.world_size:
        return workers[:cfg.world_size]
    if not restart and not (cfg.elastic and workers):
        raise UserError(
            f"train.world_size={cfg.world_size} needs {cfg.world_size} Dask workers with a GPU resource, but the "
            f"scheduler at {address} has {len(workers)} ({n_all} workers in all); start more with "
            f"`dask worker {address} --resources GPU=1` or lower train.world_size")
    if not cfg.elastic or not workers:
        why = RuntimeError(f"{len(workers)} of the {cfg.world_size} GPU workers after waiting train.rejoin_timeout_s="
                           f"{cfg.rejoin_timeout_s:g} s for replacements")
        raise Failure("infrastructure", str(why) + ("; train.elastic: true would go on with fewer" if workers else ""), why)
    print(f"train: {len(workers)} of the {cfg.world_size} GPU workers after train.rejoin_timeout_s="
          f"{cfg.rejoin_timeout_s:g} s; going on with {len(workers)} rank(s) (train.elastic): the same global batch, "
          "split over fewer ranks", file=sys.stderr, flush=True)
    return workers


def _watch(client, futures: list, workers: list[str], out: Path, poll_s: float = 0.5) -> None:
    """Wait for every rank; on the first failure (a rank's error, or its worker leaving the cluster), classify
    it, tear the group down and raise it as a Failure. Survivors still running (blocked in a collective on a
    dead peer, or hung) are ended by restarting their workers through their nannies: a Dask worker cannot
    stop a running thread, and a fresh process is what torchrun gives a relaunched group as well."""
    started = time.time()

    def lost_ranks() -> tuple[dict, list[int]]:
        alive = cluster_workers(client)
        return alive, [r for r, w in enumerate(workers) if w not in alive]

    while True:
        status = [f.status for f in futures]
        if all(st == "finished" for st in status):
            return
        alive, lost = lost_ranks()
        failed = [r for r, st in enumerate(status) if st in ("error", "cancelled")]
        user = any(status[r] == "error" and isinstance(futures[r].exception(), UserError) for r in failed)
        if failed and not lost and not user:  # a peer's collective fails at once; its worker's loss shows a moment later
            deadline = time.monotonic() + 3
            while not lost and time.monotonic() < deadline:
                time.sleep(poll_s)
                alive, lost = lost_ranks()
        if lost or failed:
            failure = _dask_failure(futures, workers, lost, failed, out, started)
            running = [w for f, w in zip(futures, workers) if f.status == "pending" and w in alive and alive[w].get("nanny")]
            client.cancel(futures, force=True)
            if running:
                try:
                    client.restart_workers(running, timeout=120, raise_for_error=False)
                except Exception as e:  # noqa: BLE001 - e.g. a worker that left meanwhile (its own watchdog ended it)
                    print(f"train: restarting Dask workers {running} to end their ranks: {e!r}", file=sys.stderr, flush=True)
            raise failure
        time.sleep(poll_s)


def _dask_failure(futures: list, workers: list[str], lost: list[int], failed: list[int], out: Path, since: float) -> Failure:
    if lost:
        r = lost[0]
        hung = out / f"hung-rank{r}.log"
        if hung.exists() and hung.stat().st_mtime >= since:
            cause = f"rank {r} on {workers[r]} hung (no step in train.step_timeout_s; stacks in {hung})"
        else:
            cause = f"Dask worker {workers[r]} running rank {r} was lost (killed, out of memory, or its machine gone)"
        return Failure("infrastructure", cause, RuntimeError(f"train: {cause}"))
    r = failed[0]
    error = futures[r].exception() if futures[r].status == "error" else RuntimeError("cancelled")
    if isinstance(error, UserError):
        return Failure("user", str(error), error)
    from distributed import KilledWorker

    peer_gone = isinstance(error, torch.distributed.DistError) or any(
        m in str(error) for m in ("Connection reset by peer", "Connection closed by peer", "NCCL"))
    lost_worker = isinstance(error, (KilledWorker, OSError, TimeoutError)) or futures[r].status == "cancelled"
    return Failure("infrastructure" if peer_gone or lost_worker else "bug", f"rank {r} on {workers[r]}: {error!r}",
                   RuntimeError(f"train rank {r} on {workers[r]} failed: {error!r}"))


# torchrun ----------------------------------------------------------------------------------------------

def on_torchrun(s: Settings, restart: bool = False) -> list[str]:
    """torchrun on this host, train.world_size ranks; its ranks read these settings, not params.yaml."""
    with tempfile.TemporaryDirectory(prefix="trainflow-torchrun-") as tmp:
        settings, errors = Path(tmp) / "settings.json", Path(tmp) / "error.txt"
        settings.write_text(absolute_paths(s).model_dump_json(by_alias=True))
        env = dict(os.environ, **{SETTINGS_ENV: str(settings), ERROR_ENV: str(errors)})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc-per-node={s.train.world_size}", "-m", "tasks.train"]
        proc = subprocess.run(cmd, env=env, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            if errors.exists():
                error = UserError(errors.read_text().strip())
                raise Failure("user", str(error), error)
            sys.stderr.write(proc.stderr)
            error = RuntimeError(f"torchrun exited with {proc.returncode}: {' '.join(cmd)} (its output is above)")
            # torchrun's report names the first rank to fail and its exit code
            root = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", proc.stderr, re.S)
            if not root:
                raise Failure("bug", f"torchrun exited with {proc.returncode}", error)
            rank, code = int(root[1]), int(root[2])
            kind = "infrastructure" if code < 0 or code == Watchdog.EXIT else "bug"
            raise Failure(kind, exit_cause(f"torchrun rank {rank}", code, s.train.step_timeout_s), error)
    return [f"torchrun local rank {r}" for r in range(s.train.world_size)]


def torchrun_rank(s: Settings) -> None:
    """This process is one rank started by torchrun: by the stage (on_torchrun), or by hand on each node.
    Started by hand, rank 0 prepares the staging directory and publishes the model when all ranks are done."""
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    by_stage = SETTINGS_ENV in os.environ
    stacks_on_sigterm()
    if by_stage:
        s = Settings.model_validate_json(Path(os.environ[SETTINGS_ENV]).read_text())
    try:
        if world != s.train.world_size:
            raise UserError(f"torchrun started {world} ranks but train.world_size is {s.train.world_size}; set "
                            "train.world_size to nnodes × nproc-per-node")
        if not by_stage and rank == 0:
            check_inputs(s)
            staging_dir(s.train.out_dir).mkdir(parents=True, exist_ok=True)  # checkpoints of an interrupted run stay
        reporting = not by_stage and rank == 0  # (started by the stage, the stage reports)
        with Progress(staging_dir(s.train.out_dir) / PROGRESS, s.train.epochs) if reporting else nullcontext():
            run_rank(s, rank, world, local, init_method="env://", local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        if reporting:
            (staging_dir(s.train.out_dir) / PROGRESS).unlink(missing_ok=True)
            replace_dir(staging_dir(s.train.out_dir), s.train.out_dir)
    except UserError as e:
        if ERROR_ENV in os.environ and not Path(os.environ[ERROR_ENV]).exists():  # the first rank's error
            Path(os.environ[ERROR_ENV]).write_text(str(e))
        raise
