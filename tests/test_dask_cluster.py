"""Preprocessing on an existing cluster started with the `dask scheduler` / `dask worker` CLIs gives the
same output as on the local cluster: by dask.address, and by the standard DASK_SCHEDULER_ADDRESS."""

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from distributed import Client

from tasks.preprocess import preprocess
from tasks.tables import pieces
from tasks.training.launch_dask import free_port
from tests.conftest import ROOT, parse
from tests.test_flights import flights_workspace, run

pytestmark = pytest.mark.slow  # real clusters, servers, flows or several ranks: `make test-fast` skips them

DASK = str(Path(sys.executable).parent / "dask")


@contextmanager
def killing_a_busy_worker(address: str):
    """While the block runs, SIGKILL the process of the first worker seen running a task (once); yields a dict
    that says which, filled once it happened."""
    import signal
    import threading

    killed, done = {}, threading.Event()

    def kill():
        with Client(address, timeout=10) as c:
            while not done.is_set() and not killed:
                busy = [w for w, tasks in c.processing().items() if tasks]
                if busy:
                    pid = c.run(os.getpid, workers=[busy[0]])[busy[0]]
                    os.kill(pid, signal.SIGKILL)
                    killed.update(worker=busy[0], pid=pid)
                time.sleep(0.01)

    killer = threading.Thread(target=kill)
    killer.start()
    try:
        yield killed
    finally:
        done.set()
        killer.join()


def wait_for_workers(address: str, n: int, seconds: float = 60) -> None:
    """Until the scheduler at address answers and has n workers."""
    deadline = time.time() + seconds
    while True:
        try:
            with Client(address, timeout=5) as c:
                c.wait_for_workers(n, timeout=max(1, deadline - time.time()))
            return
        except (OSError, TimeoutError):
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cli_cluster(tmp_path_factory):
    """A scheduler and one `dask worker` CLI with two worker processes, as on a real cluster."""
    log = tmp_path_factory.mktemp("cluster") / "scheduler.log"
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DO_NOT_TRACK": "1"}
    procs = [
        subprocess.Popen(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
            env=env,
        )
    ]
    procs.append(
        subprocess.Popen(
            [DASK, "worker", address, "--nworkers", "2", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    try:
        wait_for_workers(address, 2)
        yield address, log
    finally:
        for p in procs[::-1]:
            p.terminate()
            p.wait(timeout=30)


def snapshot(directory: Path) -> dict:
    out = {name: json.loads((directory / name).read_text()) for name in ("transform.json", "schema.json")}
    for split in ("train", "val", "test", "test_raw"):
        out[split] = pd.read_parquet(directory / split)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a["transform.json"] == b["transform.json"] and a["schema.json"] == b["schema.json"]
    for split in ("train", "val", "test", "test_raw"):
        pd.testing.assert_frame_equal(a[split], b[split], check_exact=True)


def in_row_groups(s, rows: int = 1000):
    """The workspace's source rewritten in row groups of `rows` rows (ingest and validate copy them as they are):
    preprocessing runs a task per piece of whole row groups."""
    source = Path(s.dataset.source)
    pq.write_table(pq.read_table(source), source, row_group_size=rows)
    assert pq.ParquetFile(source).num_row_groups > 4
    return s


def test_an_existing_cluster_gives_the_local_output(tmp_path, cli_cluster, monkeypatch):
    address, _ = cli_cluster  # (the scheduler log is kept for debugging)
    s = in_row_groups(flights_workspace(tmp_path, preprocess__partition_rows=1000))  # tasks over the two workers
    run(s)  # on the local cluster
    local = snapshot(Path(s.preprocess.out_dir))
    assert local["schema.json"]["rows"]["train"] > 3000

    raw = s.model_dump(by_alias=True)
    raw["dask"]["address"] = address
    preprocess(parse(raw))
    assert_same(snapshot(Path(s.preprocess.out_dir)), local)

    def transitions() -> int:  # the scheduler's count of task state changes: grows when it runs work
        with Client(address, timeout=10) as c:
            return c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)

    before = transitions()
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", address)  # dask.address stays local
    import dask

    dask.config.refresh()
    try:
        preprocess(s)
    finally:
        monkeypatch.delenv("DASK_SCHEDULER_ADDRESS")
        dask.config.refresh()
    tasks = 2 * len(pieces([Path(s.validate_.out)], s.preprocess.partition_rows))  # a task per piece in each pass
    assert transitions() >= before + 4 * tasks  # each one waiting, processing, in memory, released at least
    assert_same(snapshot(Path(s.preprocess.out_dir)), local)


def test_a_worker_killed_during_preprocessing_changes_nothing(tmp_path, cli_cluster):
    """SIGKILL a `dask worker` process while it runs preprocessing tasks: Dask reruns what was lost on the
    survivor (the nanny restarts the dead one) and the output is identical to an undisturbed run."""
    address, _ = cli_cluster
    s = in_row_groups(flights_workspace(tmp_path, preprocess__partition_rows=1000))
    run(s)  # undisturbed, on the local cluster
    reference = snapshot(Path(s.preprocess.out_dir))
    raw = s.model_dump(by_alias=True)
    raw["dask"]["address"] = address
    with killing_a_busy_worker(address) as killed:
        preprocess(parse(raw))
    assert killed, "no worker was busy to kill"
    assert_same(snapshot(Path(s.preprocess.out_dir)), reference)
