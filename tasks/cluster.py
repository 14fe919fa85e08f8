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
    address = cfg.address if cfg.address != "local" else dask.config.get("scheduler-address", None)
    if not address:
        with local_client(cfg.n_workers, cfg.threads_per_worker, cfg.processes) as client:
            _log_cluster(client, stage)
            yield client
        return
    where = "dask.address" if cfg.address != "local" else "DASK_SCHEDULER_ADDRESS"
    client = connect(address, where)
    with client:
        check_project(client)
        _log_cluster(client, stage)
        yield client


def connect(address: str, where: str):
    """A client of the scheduler at `address` (from `where`: dask.address or DASK_SCHEDULER_ADDRESS). One that
    cannot be reached is a user error that says why: a host name that does not resolve, a host that refuses the
    port (nothing listens there: a connection refused is not worth Dask's 10 s of retries), or no answer."""
    import socket
    from urllib.parse import urlparse

    from distributed import Client

    fix = (
        f"start one with `dask scheduler` (and workers with `dask worker {address}`), or use a local cluster "
        f"(dask.address: local{', DASK_SCHEDULER_ADDRESS unset' if where != 'dask.address' else ''})"
    )
    url = urlparse(address)
    if url.scheme in ("tcp", "tls") and url.hostname and url.port:
        try:
            ip = str(socket.getaddrinfo(url.hostname, url.port, type=socket.SOCK_STREAM)[0][4][0])
            socket.create_connection((ip, url.port), timeout=5).close()
        except socket.gaierror as e:
            raise UserError(f"{where}: {url.hostname} in {address} does not resolve ({e.strerror}); fix the host name") from None
        except ConnectionRefusedError:
            raise UserError(
                f"{where}: no Dask scheduler answers at {address}: {url.hostname} ({ip}) refuses connections on port "
                f"{url.port}, so nothing listens there; start the scheduler on that host (`dask scheduler --port "
                f"{url.port}`), or fix the port"
            ) from None
        except OSError:
            pass  # no answer (yet): Dask's own retries decide
    try:
        return Client(address, timeout=10)
    except (OSError, TimeoutError) as e:
        raise UserError(f"{where}: no Dask scheduler answers at {address} ({e}); {fix}") from None


def check_project(client, workers: list[str] | None = None) -> None:
    """The scheduler (it unpickles the task graph) and every worker run Trainflow's own functions, so each must
    import the project. Without it a worker fails to unpickle its first task and leaves the cluster (the run
    waits forever), and a scheduler fails the graph with a pickling traceback; name the hosts and the fix instead."""
    import importlib.util
    import socket

    module = "tasks.settings"
    try:
        found = {"scheduler": client.run_on_scheduler(importlib.util.find_spec, module)}
    except ImportError as e:
        found = {"scheduler": e}
    found |= client.run(importlib.util.find_spec, module, workers=workers, on_error="return")
    # a module spec where it imports; None, or the ImportError, where it does not
    missing = {w: str(spec or f"No module named {module!r}") for w, spec in found.items() if not hasattr(spec, "origin")}
    if not missing:
        return
    on_workers = [w for w in missing if w != "scheduler"]
    hosts = client.run(socket.gethostname, workers=on_workers, on_error="return") if on_workers else {}
    if "scheduler" in missing:
        hosts["scheduler"] = client.run_on_scheduler(socket.gethostname)
    where = {w: f"the scheduler {client.scheduler.address}" if w == "scheduler" else f"worker {w}" for w in missing}
    listed = "; ".join(f"{where[w]} on host {hosts.get(w)}: {e}" for w, e in missing.items())
    raise UserError(
        f"Trainflow cannot be imported on the Dask cluster: {listed}. Install the project in the Python environment of "
        "those hosts (`pip install` it, or run the same image as this machine), or stop them: the scheduler and every "
        "worker run Trainflow's own functions"
    )


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
    return gather(client, client.compute(collections))


def gather(client, futures: list) -> list:
    """The futures' results, once all are done (a progress bar on a terminal; in logs, where a progress bar
    cannot redraw, a line every 30 s)."""
    from distributed import progress, wait

    if sys.stdout.isatty():
        progress(futures)
    waited = 0
    while True:
        try:
            wait(futures, timeout=30)
            break
        except TimeoutError:
            waited += 30
            log.info("still computing after %d s: %d of %d outputs done", waited, sum(f.done() for f in futures), len(futures))
    return [f.result() for f in futures]  # raises the first task error here
