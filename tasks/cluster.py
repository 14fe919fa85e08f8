"""The Dask client every distributed stage uses: a local cluster by default, or an existing scheduler."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager

import dask

from tasks import timeline
from tasks.errors import UserError
from tasks.settings import DaskSettings

log = logging.getLogger(__name__)


@contextmanager
def dask_client(cfg: DaskSettings, stage: str):
    """A client of a local cluster (`dask.address: local`, bound to 127.0.0.1, sized to the machine unless
    dask.n_workers / threads_per_worker say otherwise) or of an existing scheduler: dask.address, or the
    standard DASK_SCHEDULER_ADDRESS when dask.address is local."""
    from distributed import Client

    address = cfg.address if cfg.address != "local" else dask.config.get("scheduler-address", None)
    if not address:
        with local_client(cfg.n_workers, cfg.threads_per_worker, cfg.processes) as client:
            _log_cluster(client, stage)
            yield client
        return
    try:
        client = Client(address, timeout=10)
    except (OSError, TimeoutError) as e:
        where = "dask.address" if cfg.address != "local" else "DASK_SCHEDULER_ADDRESS"
        raise UserError(
            f"{where}: no Dask scheduler answers at {address} ({e}); start one with `dask scheduler` "
            f"(and workers with `dask worker {address}`), or use a local cluster (dask.address: local"
            f"{', DASK_SCHEDULER_ADDRESS unset' if where != 'dask.address' else ''})"
        ) from None
    with client:
        _log_cluster(client, stage)
        yield client


@contextmanager
def local_client(n_workers: int | None = None, threads_per_worker: int | None = None, processes: bool = False):
    """A client of a local cluster that listens on 127.0.0.1 only: scheduler, workers, dashboards."""
    from distributed import Client, LocalCluster

    # its INFO lines drown the run's own log; the worker processes read the variable when they start
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    t0 = time.time()
    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=processes,
            **({"host": "127.0.0.1"} if processes else {}),  # (threads talk in-process: no address at all)
            dashboard_address="127.0.0.1:0",
            worker_dashboard_address="127.0.0.1:0",
            silence_logs=logging.WARNING,
        ) as cluster,
        Client(cluster) as client,
    ):
        timeline.add("cluster start", t0, time.time())
        yield client


def cluster_workers(client) -> dict:
    """The scheduler's workers now, by address. (Client.scheduler_info returns the client's cached copy, which
    its periodic refresh can replace, at any moment, by one that lists no workers at all.)"""
    return client.sync(client.scheduler.identity, n_workers=-1)["workers"]


def _log_cluster(client, stage: str) -> None:
    workers = cluster_workers(client)
    threads = sum(w.get("nthreads", 0) for w in workers.values())
    dashboard = f", dashboard {client.dashboard_link}" if "dashboard" in client.scheduler_info().get("services", {}) else ""
    log.info("%s on Dask: %s, %d workers, %d threads%s", stage, client.scheduler.address, len(workers), threads, dashboard)


def show_progress(client, collections: list) -> list:
    """Compute the collections on the cluster (with a progress bar on a terminal); return their results."""
    from distributed import progress, wait

    futures = client.compute(collections)
    if sys.stdout.isatty():
        progress(futures)
    waited = 0
    while True:  # a line now and then in logs (Prefect, CI), where a progress bar cannot redraw
        try:
            wait(futures, timeout=30)
            break
        except TimeoutError:
            waited += 30
            log.info("still computing after %d s: %d of %d outputs done", waited, sum(f.done() for f in futures), len(futures))
    return [f.result() for f in futures]  # raises the first task error here
