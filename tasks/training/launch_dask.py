"""The dask launcher: one rank per worker of the dask.address cluster that declares a GPU resource.

Start one worker per GPU (`dask worker ADDRESS --resources GPU=1`; with dask-cuda, `dask cuda worker ADDRESS
--resources GPU=1` pins each worker to its GPU). Rank 0's worker gives its host and a free port for the
rendezvous. Workers read the features and rank 0 writes the model at the same absolute paths as this process:
a filesystem shared with them. The launcher watches the ranks' futures and the scheduler's list of workers: a
worker that leaves the cluster is a lost rank, and its survivors are ended by restarting their workers.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

from tasks.cluster import check_project, cluster_workers, connect
from tasks.errors import InfrastructureError, TrainflowError, UserError
from tasks.settings import Settings, absolute_paths
from tasks.training.checkpoint import staging_dir
from tasks.training.loop import run_rank


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def gpu_workers(workers: dict) -> list[str]:
    """Addresses of the workers that declare a GPU resource, grouped by host, in a stable order."""
    gpu = [a for a, w in workers.items() if w.get("resources", {}).get("GPU", 0) >= 1]
    return sorted(gpu, key=lambda a: (urlparse(a).hostname or "", a))


def _dask_rank(s: Settings, rank: int, world: int, local_rank: int, local_world: int, init_method: str) -> str:
    run_rank(s, rank, world, local_rank, init_method, local_world=local_world)
    return socket.gethostname()


def on_dask(s: Settings, restart: bool = False) -> list[str]:
    import dask

    cfg = s.train
    address = s.dask.address if s.dask.address != "local" else dask.config.get("scheduler-address", None)
    with connect(address, "dask.address" if s.dask.address != "local" else "DASK_SCHEDULER_ADDRESS") as client:
        workers = _rank_workers(client, cfg, address, restart)
        check_project(client, workers)
        world = len(workers)
        s = absolute_paths(s)
        schema = str(Path(s.preprocess.out_dir) / "schema.json")
        blind = [w for w, seen in client.run(os.path.exists, schema, workers=workers).items() if not seen]
        if blind:
            raise UserError(
                f"Dask workers {blind} cannot read {schema}: the dask launcher needs the workspace on a "
                "filesystem the workers share, at the same path"
            )
        hosts = [urlparse(w).hostname for w in workers]
        per_host, seen = Counter(hosts), Counter[str | None]()
        local_ranks = []
        for h in hosts:
            local_ranks.append(seen[h])
            seen[h] += 1
        port = client.run(free_port, "", workers=[workers[0]])[workers[0]]
        init = f"tcp://{hosts[0]}:{port}"
        run = uuid.uuid4().hex[:8]
        futures = [
            client.submit(
                _dask_rank,
                s,
                r,
                world,
                local_ranks[r],
                per_host[hosts[r]],
                init,
                key=f"trainflow-train-rank{r}-{run}",
                workers=[w],
                resources={"GPU": 1},
                pure=False,
                allow_other_workers=False,
            )
            for r, w in enumerate(workers)
        ]
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
        return workers[: cfg.world_size]
    if not restart and not (cfg.elastic and workers):
        raise UserError(
            f"train.world_size={cfg.world_size} needs {cfg.world_size} Dask workers with a GPU resource, but the "
            f"scheduler at {address} has {len(workers)} ({n_all} workers in all); start more with "
            f"`dask worker {address} --resources GPU=1` or lower train.world_size"
        )
    if not cfg.elastic or not workers:
        raise InfrastructureError(
            f"{len(workers)} of the {cfg.world_size} GPU workers after waiting train.rejoin_timeout_s="
            f"{cfg.rejoin_timeout_s:g} s for replacements" + ("; train.elastic: true would go on with fewer" if workers else "")
        )
    print(
        f"train: {len(workers)} of the {cfg.world_size} GPU workers after train.rejoin_timeout_s="
        f"{cfg.rejoin_timeout_s:g} s; going on with {len(workers)} rank(s) (train.elastic): the same global batch, "
        "split over fewer ranks",
        file=sys.stderr,
        flush=True,
    )
    return workers


def _watch(client, futures: list, workers: list[str], out: Path, poll_s: float = 0.5) -> None:
    """Wait for every rank; on the first failure (a rank's error, or its worker leaving the cluster), classify
    it, tear the group down and raise it (tasks/errors.py). Survivors still running (blocked in a collective on a
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
                except Exception as e:
                    print(f"train: restarting Dask workers {running} to end their ranks: {e!r}", file=sys.stderr, flush=True)
            raise failure
        time.sleep(poll_s)


def _dask_failure(futures: list, workers: list[str], lost: list[int], failed: list[int], out: Path, since: float) -> Exception:
    """The first failure, as its type: a lost worker or a hung rank (infrastructure), or the rank's own error
    (a rank classifies a collective that failed on a dead peer itself: tasks/training/loop.py)."""
    from distributed import KilledWorker

    if lost:
        r = lost[0]
        hung = out / f"hung-rank{r}.log"
        if hung.exists() and hung.stat().st_mtime >= since:
            return InfrastructureError(f"rank {r} on {workers[r]} hung (no step in train.step_timeout_s; stacks in {hung})")
        return InfrastructureError(
            f"Dask worker {workers[r]} running rank {r} was lost (killed, out of memory, or its machine gone)"
        )
    r = failed[0]
    error = futures[r].exception() if futures[r].status == "error" else None
    if isinstance(error, TrainflowError):
        return error
    if error is None or isinstance(error, (KilledWorker, OSError, TimeoutError)):  # cancelled, or Dask lost the task
        return InfrastructureError(f"rank {r} on {workers[r]}: {error!r}")
    return RuntimeError(f"train rank {r} on {workers[r]} failed: {error!r}")  # a bug
