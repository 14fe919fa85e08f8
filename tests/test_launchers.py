"""The same training under every launcher and strategy: local processes, torchrun, ranks on the GPU-resource
workers of a real Dask cluster (CPU and gloo here), and FSDP; plus the step-time split they report."""

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from distributed import Client

from tasks.cluster import cluster_workers
from tasks.settings import UserError
from tasks.train import train
from tasks.training.launch_dask import gpu_workers
from tasks.training.model import load_model
from tests.conftest import ROOT, cli_root, parse, same_parameters, variant
from tests.test_dask_cluster import DASK, free_port, wait_for_workers

pytestmark = pytest.mark.slow  # real clusters, servers, flows or several ranks: `make test-fast` skips them


@pytest.fixture(scope="module")
def local_two(features, tmp_path_factory):
    """The reference: 2 local ranks, 2 epochs."""
    root = tmp_path_factory.mktemp("local2")
    summary = train(variant(features, root, world_size=2, epochs=2))
    return root, summary


@contextmanager
def dask_gpu_cluster(cwd: Path, gpu: int = 2, plain: int = 0, nanny: bool = True, **env):
    """A `dask scheduler` and `dask worker` CLIs: `gpu` workers with `--resources GPU=1`, `plain` without, each
    with its own process group, started in `cwd` (workers find files by absolute path only) with `env` added."""
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DO_NOT_TRACK": "1", "DASK_LOGGING__DISTRIBUTED": "warning", **env}
    common = ["--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"] + ([] if nanny else ["--no-nanny"])
    logs = cwd / "dask-logs"  # kept with the test's temporary directory
    logs.mkdir(exist_ok=True)
    procs = [
        subprocess.Popen(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(logs / "scheduler.log").open("w"),
        )
    ]
    procs += [
        subprocess.Popen(
            [DASK, "worker", address, *common, *extra],
            cwd=cwd,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=(logs / f"worker{i}.log").open("w"),
        )
        for i, extra in enumerate([["--resources", "GPU=1"]] * gpu + [[]] * plain)
    ]
    try:
        wait_for_workers(address, gpu + plain)
        yield address
    finally:
        for p in procs[::-1]:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    """Two GPU-resource workers and one without it."""
    with dask_gpu_cluster(tmp_path_factory.mktemp("workers-cwd"), gpu=2, plain=1) as address:
        yield address


def on_cluster(s, root: Path, address: str, **train_overrides):
    raw = variant(s, root, **train_overrides).model_dump(by_alias=True)
    raw["dask"]["address"], raw["train"]["launcher"] = address, "dask"
    return parse(raw)


def test_dask_launcher_trains_on_the_gpu_workers_to_the_local_parameters(features, local_two, gpu_cluster, tmp_path):
    ref, _ = local_two
    summary = train(on_cluster(features, tmp_path, gpu_cluster, world_size=2, epochs=2))
    same_parameters(ref / "model", tmp_path / "model", atol=1e-6)
    with Client(gpu_cluster, timeout=10) as c:
        gpu = gpu_workers(cluster_workers(c))
    assert summary["launcher"] == "dask" and sorted(summary["placement"]) == gpu  # one rank on each GPU worker
    assert (tmp_path / "model/model.pt").exists() and (tmp_path / "live/metrics.json").exists()


def test_dask_launcher_refuses_more_ranks_than_gpu_workers_instead_of_hanging(features, gpu_cluster, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(
        UserError,
        match=r"train.world_size=3 needs 3 Dask workers with a GPU resource, but the scheduler "
        r"at tcp://127.0.0.1:\d+ has 2 \(3 workers in all\); start more with `dask worker "
        r"tcp://127.0.0.1:\d+ --resources GPU=1`",
    ):
        train(on_cluster(features, tmp_path, gpu_cluster, world_size=3, epochs=1))
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "model").exists()


def test_torchrun_launcher_trains_to_the_local_parameters(features, local_two, tmp_path):
    ref, _ = local_two
    summary = train(variant(features, tmp_path, launcher="torchrun", world_size=2, epochs=2))
    assert summary["launcher"] == "torchrun" and summary["world_size"] == 2
    same_parameters(ref / "model", tmp_path / "model", atol=1e-6)


def test_torchrun_by_hand_with_another_world_size_is_refused(features, tmp_path):
    s = variant(features, tmp_path, launcher="torchrun", world_size=2, epochs=1)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "tasks.train"],
        cwd=cli_root(s),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "torchrun started 1 ranks but train.world_size is 2; set train.world_size to nnodes × nproc-per-node" in proc.stderr


def test_fsdp_shards_and_trains_to_the_ddp_parameters(features, local_two, tmp_path):
    """FSDP2 on 2 gloo ranks: the parameters of DDP to 1e-5 (model parallel, same math), a model file that
    loads without FSDP, and its checkpoint holds whole (gathered) tensors."""
    ref, _ = local_two
    summary = train(variant(features, tmp_path, strategy="fsdp", world_size=2, epochs=2))
    assert summary["strategy"] == "fsdp"
    same_parameters(ref / "model", tmp_path / "model", atol=1e-5)
    ckpt = torch.load(next((tmp_path / "model/checkpoints").glob("*.pt")), weights_only=True)
    model, _ = load_model(tmp_path / "model/model.pt")
    assert {k: v.shape for k, v in ckpt["model"].items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_steps_report_where_time_goes_reduced_over_ranks(features, local_two):
    root, summary = local_two
    n_train = json.loads((Path(features.preprocess.out_dir) / "schema.json").read_text())["rows"]["train"]
    assert summary["placement"] == ["local process 0", "local process 1"]
    epochs = summary["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert e["data_s"] > 0 and e["compute_s"] > 0 and e["sync_s"] > 0 and e["samples_per_s"] > 0
        # the split covers the training steps: data + compute + sync = the epoch's step time
        assert e["data_s"] + e["compute_s"] + e["sync_s"] == pytest.approx(n_train / e["samples_per_s"], rel=0.05)
    live = json.loads((root / "live/metrics.json").read_text())  # dvclive: what a person compares across runs
    assert set(live) == {"train", "val", "lr", "perf", "step"} and live["perf"]["samples_per_s"] > 0
    rows = (root / "live/plots/metrics/perf/samples_per_s.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows] == ["step", "1", "2"]  # one row per epoch, one run (rank 0 alone logs)
