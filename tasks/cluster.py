"""The Dask client every distributed stage uses: a local cluster by default, or an existing scheduler."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from tasks.settings import DaskSettings, UserError

log = logging.getLogger(__name__)


@contextmanager
def dask_client(cfg: DaskSettings, stage: str):
    """A client of a local cluster (`dask.address: local`, bound to 127.0.0.1) or of an existing scheduler."""
    from distributed import Client, LocalCluster

    if cfg.address == "local":
        # its INFO lines drown the run's own log; the worker processes read the variable when they start
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        logging.getLogger("distributed").setLevel(logging.WARNING)
        # processes talk TCP on 127.0.0.1; threads of this process talk in-process (inproc://, no socket)
        with LocalCluster(
            n_workers=cfg.n_workers, threads_per_worker=cfg.threads_per_worker, processes=cfg.processes,
            **({"host": "127.0.0.1"} if cfg.processes else {}), dashboard_address="127.0.0.1:0",
            silence_logs=logging.WARNING,
        ) as cluster, Client(cluster) as client:
            log.info("%s on Dask: %s (dashboard %s)", stage, client.scheduler.address, client.dashboard_link)
            yield client
        return
    try:
        client = Client(cfg.address, timeout=10)
    except (OSError, TimeoutError) as e:
        raise UserError(
            f"dask.address: no Dask scheduler answers at {cfg.address} ({e}); start one with "
            "`dask scheduler` or set dask.address: local"
        ) from None
    with client:
        log.info("%s on Dask: %s (dashboard %s)", stage, client.scheduler.address, client.dashboard_link)
        yield client
