"""Across hosts (tests/multihost.py: network namespaces on a private bridge, the real `dask scheduler`, `dask
worker` and `torchrun` CLIs): preprocessing on a remote cluster, ranks placed on two worker hosts by the dask
launcher and by multi-node torchrun, a worker host's network cut mid-training, and the bad inputs of a cluster
(a scheduler that refuses, a worker host without the project)."""

import json
import re
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tasks.train import train
from tests.conftest import ROOT, cli_root, parse, same_parameters, variant
from tests.harness import FAULT_ENV, FAULTS
from tests.multihost import BIN, available, dask_cluster, project_network
from tests.test_dask_cluster import assert_same, in_row_groups, snapshot
from tests.test_flights import flights_workspace, run

pytestmark = [
    pytest.mark.slow,  # real clusters on several hosts: `make test-fast` skips them
    pytest.mark.skipif(available() is not None, reason=str(available())),
]

HOSTS = {"scheduler": 10, "worker1": 11, "worker2": 12, "worker3": 13, "client": 20}
RUN = dict(world_size=2, epochs=3, checkpoint_every="5 steps", dropout=0.0)  # 11 steps an epoch
TTL = "10s"  # the scheduler drops a worker it has not heard from in this long (Dask's default: 5 minutes)
CONNECT = "5s"  # a connection to an unreachable host fails after this long (Dask's default: 30 s)
LOST = r"rank [01] on tcp://10\.77\.0\.1[12]:\d+ hung \(no step in train.step_timeout_s; stacks in \S+hung-rank[01]\.log\)"


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    with project_network(HOSTS, tmp_path_factory.mktemp("multihost")) as net:
        yield net


@pytest.fixture
def cluster(net):
    with dask_cluster(net, "scheduler", ["worker1", "worker2"], DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL=TTL) as address:
        yield address


def on_cluster(s, address: str):
    raw = s.model_dump(by_alias=True)
    raw["dask"]["address"] = address
    if raw["train"]["world_size"] > 1:
        raw["train"]["launcher"] = "dask"
    return parse(raw)


def stage(net, s, name: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m tasks.NAME` on the client host (a checkout of the project), with settings `s`."""
    return net["client"].run(
        str(BIN / "python"), "-m", f"tasks.{name}", cwd=cli_root(s), env=net.env(PYTHONPATH=str(ROOT)), check=check
    )


@pytest.fixture(scope="module")
def one_process(features, tmp_path_factory):
    """The reference: the same training in one process (ranks split the same global batches)."""
    root = tmp_path_factory.mktemp("one-process")
    return root, train(variant(features, root, **{**RUN, "world_size": 1}))


WORK_DONE = """
import json, sys
from distributed import Client
with Client(sys.argv[1], timeout=10) as c:
    print(json.dumps(c.run(lambda dask_worker: dask_worker.state.transition_counter)))
"""


def test_preprocessing_on_the_cluster_across_hosts_is_identical_to_local(net, cluster, tmp_path):
    s = in_row_groups(flights_workspace(tmp_path, preprocess__partition_rows=1000))  # tasks for the two workers
    run(s)  # on a local cluster, in this process
    local = snapshot(Path(s.preprocess.out_dir))
    before = net["client"].python(WORK_DONE, cluster)
    t0 = time.perf_counter()
    stage(net, on_cluster(s, cluster), "preprocess")
    seconds = time.perf_counter() - t0
    after = net["client"].python(WORK_DONE, cluster)
    assert_same(snapshot(Path(s.preprocess.out_dir)), local)
    assert sorted(urlparse(w).hostname for w in after) == ["10.77.0.11", "10.77.0.12"]
    done = {w: after[w] - before[w] for w in after}  # task state changes on each worker during the stage
    assert sum(done.values()) > 20 and all(n >= 0.2 * sum(done.values()) for n in done.values()), done  # both did work
    print(f"preprocess from the client host on 2 worker hosts: {seconds:.1f} s")


def test_the_dask_launcher_puts_one_rank_on_each_worker_host_with_the_one_process_parameters(
    net, cluster, features, one_process, tmp_path
):
    ref, _ = one_process
    s = on_cluster(variant(features, tmp_path, **RUN), cluster)
    t0 = time.perf_counter()
    stage(net, s, "train")
    seconds = time.perf_counter() - t0
    summary = json.loads((tmp_path / "model/summary.json").read_text())
    assert summary["launcher"] == "dask" and summary["world_size"] == 2
    assert [urlparse(w).hostname for w in summary["placement"]] == ["10.77.0.11", "10.77.0.12"]  # rank r on worker r+1
    same_parameters(ref / "model", tmp_path / "model", atol=1e-5)
    print(f"train, 2 ranks on 2 worker hosts (dask launcher), from the client host: {seconds:.1f} s")


def test_torchrun_across_two_nodes_with_c10d_rendezvous_trains_to_the_one_process_parameters(
    net, features, one_process, tmp_path
):
    ref, _ = one_process
    s = variant(features, tmp_path, launcher="torchrun", **RUN)
    cwd = cli_root(s)
    cmd = [str(BIN / "torchrun"), "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d"]
    cmd += ["--rdzv-endpoint=worker1:29500", "--rdzv-id=trainflow", "-m", "tasks.train"]
    t0 = time.perf_counter()
    nodes = [net[w].spawn(*cmd, log=f"torchrun-{w}.log", cwd=cwd) for w in ("worker1", "worker2")]
    codes = [p.wait(timeout=300) for p in nodes]
    seconds = time.perf_counter() - t0
    assert codes == [0, 0], (net.logs / "torchrun-worker1.log").read_text()[-3000:]
    summary = json.loads((tmp_path / "model/summary.json").read_text())
    assert summary["world_size"] == 2
    same_parameters(ref / "model", tmp_path / "model", atol=1e-5)
    print(f"torchrun, 2 nodes x 1 rank, c10d rendezvous on worker1: {seconds:.1f} s")


def cut_run(net, features, tmp_path, restore: bool, **train_overrides):
    """Rank 1 pulls its host's (worker2's) cable after its 18th step (mid-epoch 2), on a cluster started for it;
    with `restore`, the cable goes back once the launcher has seen the failure. The run's summary and seconds."""
    fired = tmp_path / "fired"
    env = {FAULT_ENV: f"cut:1:18:{fired}", "PYTHONPATH": f"{FAULTS}:{net.site}", "DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": TTL}
    env["DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT"] = CONNECT  # the scheduler's restart of the cut host's nanny gives up
    try:
        with dask_cluster(net, "scheduler", ["worker1", "worker2"], **env) as address:
            s = on_cluster(variant(features, tmp_path, step_timeout_s=5, **RUN, **train_overrides), address)
            t0 = time.perf_counter()
            proc = net["client"].spawn(
                str(BIN / "python"), "-m", "tasks.train", log="cut-train.log", cwd=cli_root(s), env=net.env(PYTHONPATH=str(ROOT))
            )
            while not fired.exists() and proc.poll() is None:
                time.sleep(0.2)
            cut = time.perf_counter()
            staging = tmp_path / ".model.partial"
            while restore and not list(staging.glob("hung-rank*.log")) and proc.poll() is None:
                time.sleep(0.2)
            seen = time.perf_counter()
            if restore:
                net["worker2"].restore()
            assert proc.wait(timeout=300) == 0, (net.logs / "cut-train.log").read_text()[-3000:]
    finally:
        net["worker2"].restore()
    done = time.perf_counter() - cut
    print(f"cut {cut - t0:.1f} s into the run; the hang seen {seen - cut:.1f} s later; run done {done:.1f} s after the cut")
    return json.loads((tmp_path / "model/summary.json").read_text())


def test_a_worker_host_cut_off_mid_training_is_detected_and_the_group_restarts_when_it_is_back(
    net, features, one_process, tmp_path
):
    ref, ref_summary = one_process
    summary = cut_run(net, features, tmp_path, restore=True, rejoin_timeout_s=60)
    (failure,) = summary["restarts"]
    assert failure["kind"] == "infrastructure" and re.fullmatch(LOST, failure["cause"]), failure["cause"]
    assert [urlparse(w).hostname for w in summary["placement"]] == ["10.77.0.11", "10.77.0.12"]  # both hosts again
    assert summary["resumed_from"]["steps"] == 15 and summary["steps"] == ref_summary["steps"]  # the checkpoint before
    same_parameters(ref / "model", tmp_path / "model", atol=1e-5)


def test_a_worker_host_cut_off_for_good_leaves_an_elastic_run_going_on_the_other(net, features, one_process, tmp_path):
    ref, ref_summary = one_process
    summary = cut_run(net, features, tmp_path, restore=False, rejoin_timeout_s=5, elastic=True)
    (failure,) = summary["restarts"]
    assert failure["kind"] == "infrastructure" and re.fullmatch(LOST, failure["cause"]), failure["cause"]
    assert summary["world_size"] == 1 and [urlparse(w).hostname for w in summary["placement"]] == ["10.77.0.11"]
    assert summary["resumed_from"]["steps"] == 15 and summary["steps"] == ref_summary["steps"]
    same_parameters(ref / "model", tmp_path / "model", atol=1e-5)


def test_a_scheduler_host_that_refuses_the_port_is_named_at_once(net, features, tmp_path):
    s = on_cluster(variant(features, tmp_path), "tcp://scheduler:8786")  # the host is up; no scheduler runs there
    t0 = time.perf_counter()
    proc = stage(net, s, "preprocess", check=False)
    assert proc.returncode == 2 and time.perf_counter() - t0 < 30
    assert proc.stderr.strip() == (
        "error: dask.address: no Dask scheduler answers at tcp://scheduler:8786: scheduler (10.77.0.10) refuses "
        "connections on port 8786, so nothing listens there; start the scheduler on that host (`dask scheduler --port "
        "8786`), or fix the port"
    )


def test_hosts_without_the_project_are_named_before_any_task_runs(net, features, tmp_path):
    """A worker host without Trainflow would fail to unpickle its first task and leave the cluster (the run then
    waits forever); a scheduler without it fails the graph with a pickling traceback. Both are named at once."""
    raw = features.model_dump(by_alias=True)
    raw["preprocess"]["out_dir"] = str(tmp_path / "features")
    fix = (
        r"\. Install the project in the Python environment of those hosts \(`pip install` it, or run the same image as "
        r"this machine\), or stop them: the scheduler and every worker run Trainflow's own functions"
    )
    with dask_cluster(net, "scheduler", ["worker1", "worker3"], bare=("worker3",)) as address:
        for name, s in [
            ("preprocess", on_cluster(parse(raw), address)),
            ("train", on_cluster(variant(features, tmp_path, world_size=2), address)),
        ]:
            proc = stage(net, s, name, check=False)
            assert proc.returncode == 2 and re.fullmatch(
                r"error: Trainflow cannot be imported on the Dask cluster: worker tcp://10\.77\.0\.13:\d+ on host "
                r"worker3: No module named 'tasks'" + fix,
                proc.stderr.strip(),
            ), proc.stderr
    with dask_cluster(net, "scheduler", ["worker1"], bare=("scheduler",)) as address:
        proc = stage(net, on_cluster(parse(raw), address), "preprocess", check=False)
        assert proc.returncode == 2 and proc.stderr.strip() == (
            "error: Trainflow cannot be imported on the Dask cluster: the scheduler tcp://scheduler:8786 on host "
            "scheduler: No module named 'tasks'" + fix.replace("\\", "")
        ), proc.stderr
    assert not (tmp_path / "model").exists() and not (tmp_path / "features").exists()
