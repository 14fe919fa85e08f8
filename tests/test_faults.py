"""Faults injected into real training runs (real processes, real signals): a rank SIGKILLed, a rank hung, a
corrupt latest checkpoint, restarts exhausted, the stage process killed, a Dask worker running a rank lost
(replaced, or not: elastic); and checkpoints that must be refused."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed import Client

from tasks.cluster import cluster_workers
from tasks.errors import InfrastructureError, RestartsExhausted, UserError
from tasks.train import train
from tasks.training.checkpoint import listed, staging_dir
from tests.conftest import cli_root, same_parameters, variant
from tests.harness import FAULT_ENV, fault
from tests.test_launchers import dask_gpu_cluster, on_cluster

pytestmark = pytest.mark.slow  # real clusters, servers, flows or several ranks: `make test-fast` skips them

RUN = dict(world_size=2, epochs=2, checkpoint_every="5 steps", keep_checkpoints=3)  # 11 steps an epoch


def inject(monkeypatch, spec: str) -> None:
    """A rank of this test's training fails on cue (tests/faults/fault_hook.py), in this process or its children."""
    for key, value in fault(spec).items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def uninterrupted(features, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    return root, train(variant(features, root, **RUN))


def test_a_sigkilled_rank_restarts_the_group_from_its_checkpoint_to_the_same_parameters(
    features, uninterrupted, tmp_path, monkeypatch
):
    ref, ref_summary = uninterrupted
    inject(monkeypatch, f"kill:1:18:{tmp_path / 'fired'}")  # rank 1, mid-epoch 2 (steps 12-22)
    t0 = time.perf_counter()
    summary = train(variant(features, tmp_path, **RUN))
    assert (tmp_path / "fired").exists()
    assert [(r["kind"], r["cause"]) for r in summary["restarts"]] == [
        ("infrastructure", "rank 1 killed by SIGKILL (out of memory?)")
    ]
    resumed = summary["resumed_from"]
    assert (resumed["steps"], resumed["epoch"], resumed["step_in_epoch"]) == (15, 2, 4)  # mid-epoch 2: 3 steps lost
    assert summary["steps"] == ref_summary["steps"] and summary["best_val_rmse"] == pytest.approx(
        ref_summary["best_val_rmse"], abs=1e-9
    )
    same_parameters(ref / "model", tmp_path / "model", atol=1e-6)
    print(f"SIGKILL -> finished in {time.perf_counter() - t0:.1f} s (attempt 1 ran {summary['restarts'][0]['seconds']} s)")


def test_a_hung_rank_is_detected_its_stacks_logged_and_the_group_restarted(features, uninterrupted, tmp_path, monkeypatch, capfd):
    ref, _ = uninterrupted
    inject(monkeypatch, f"hang:0:7:{tmp_path / 'fired'}")
    summary = train(variant(features, tmp_path, step_timeout_s=3, **RUN))
    assert [r["kind"] for r in summary["restarts"]] == ["infrastructure"]
    # rank 0 hangs before its step; rank 1 waits for it in the gradient all-reduce: either one's watchdog fires first
    assert summary["restarts"][0]["cause"] in {
        f"rank {r} hung (no step in train.step_timeout_s=3 s; stacks in the log)" for r in (0, 1)
    }
    err = capfd.readouterr().err
    assert "finished no step in" in err and "hung. Its Python stacks:" in err
    assert "(most recent call first)" in err  # faulthandler's dump of the rank's threads
    dumps = sorted((tmp_path / "model").glob("hung-rank*.log"))  # and the same in the run's directory
    assert dumps and all("(most recent call first)" in d.read_text() for d in dumps)
    same_parameters(ref / "model", tmp_path / "model", atol=1e-6)


def test_corrupt_latest_checkpoints_fall_back_to_the_newest_valid_one(features, uninterrupted, tmp_path, monkeypatch, capfd):
    ref, _ = uninterrupted
    inject(monkeypatch, f"kill:0:18:{tmp_path / 'fired'}")
    s = variant(features, tmp_path, max_restarts=0, **RUN)
    with pytest.raises(
        RestartsExhausted,
        match=r"train: gave up after 0 restart\(s\) \(train.max_restarts\): #1 infrastructure: rank 0 "
        r"killed by SIGKILL .* The checkpoints are kept in .*checkpoints",
    ):
        train(s)
    ckpts = listed(staging_dir(s.train.out_dir) / "checkpoints")
    # the newest three (a kill between a write and its pruning can leave an older one too, pruned next time)
    assert [p.name for p in ckpts][-3:] == ["step-00000010.pt", "step-00000011.pt", "step-00000015.pt"]
    with open(ckpts[-1], "r+b") as f:  # truncate the newest
        f.truncate(1000)
    with open(ckpts[-2], "r+b") as f:  # and flip a byte of the one before
        f.seek(500)
        byte = f.read(1)
        f.seek(500)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.delenv(FAULT_ENV)
    summary = train(s)
    assert summary["resumed_from"]["steps"] == 10  # mid-epoch 1, before the two corrupt ones
    err = capfd.readouterr().err
    for name in ("step-00000015.pt", "step-00000011.pt"):
        assert f"{name} skipped: {name} does not match its sha256: corrupt or truncated" in err
    same_parameters(ref / "model", tmp_path / "model", atol=1e-6)
    # dvclive had logged epoch 1 before the kill; resumed before its end, it is logged once, not twice
    rows = (tmp_path / "live/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows] == ["step", "1", "2"]  # the epochs, counted from 1
    assert json.loads((tmp_path / "live/metrics.json").read_text())["step"] == 2


def test_a_killed_stage_process_resumes_from_its_checkpoint(features, tmp_path):
    """The stage (what `dvc repro` or a flow runs) SIGKILLed mid-run; the next run continues where it was."""
    ref = tmp_path / "ref"
    one = dict(world_size=1, epochs=2, checkpoint_every="4 steps")
    reference = train(variant(features, ref, **one))
    s = variant(features, tmp_path / "run", **one)
    cwd = cli_root(s)
    env = {**os.environ, **fault(f"kill:0:14:{tmp_path / 'fired'}")}
    killed = subprocess.run([sys.executable, "-m", "tasks.train"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "run/model/model.pt").exists()
    again = subprocess.run([sys.executable, "-m", "tasks.train"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "train: resuming from" in again.stdout
    summary = json.loads((tmp_path / "run/model/summary.json").read_text())
    # the newest checkpoint on disk when it was killed (writes are asynchronous: 12, or one before it)
    assert summary["resumed_from"]["steps"] in (4, 8, 11, 12) and summary["steps"] == reference["steps"]
    same_parameters(ref / "model", tmp_path / "run" / "model", atol=1e-6)


def test_a_dvclive_summary_cut_by_a_kill_is_written_anew_on_resume(tmp_path):
    """A stage killed while dvclive rewrote its summary (metrics.json, not written atomically) left it empty:
    the resumed run must not fail reading it (found by test_a_killed_stage_process_resumes_from_its_checkpoint)."""
    from tasks.training.live import log_epoch, open_live

    (tmp_path / "metrics.json").write_text('{"step": 3, "train": {"lo')  # what the kill left
    live = open_live(str(tmp_path), 3)
    log_epoch(live, {"epoch": 4, "train_loss": 0.5}, tmp_path / "progress.jsonl")
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["step"] == 4 and summary["train"]["loss"] == 0.5


def test_checkpoints_that_are_not_ours_or_not_this_model_are_refused(features, uninterrupted, tmp_path):
    ref, summary = uninterrupted
    good = ref / "model/checkpoints" / f"step-{summary['steps']:08d}.pt"
    with pytest.raises(
        UserError,
        match=r"was trained with another model config \(hidden: \[32, 32\] there, \[16\] now\); it is "
        r"not loaded, not even in part",
    ):
        train(variant(features, tmp_path / "a", resume_from=str(good), hidden=[16], epochs=3))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Path("/etc/passwd")))
    evil.with_suffix(".sha256").write_text(__import__("hashlib").sha256(evil.read_bytes()).hexdigest())
    with pytest.raises(
        UserError,
        match=r"is not a Trainflow checkpoint \(it holds objects a checkpoint never does, and was not "
        r"unpickled\)",
    ):
        train(variant(features, tmp_path / "b", resume_from=str(evil)))
    old = tmp_path / "old.pt"
    state = torch.load(good, weights_only=True)
    torch.save(state | {"format": 0}, old)
    old.with_suffix(".sha256").write_text(__import__("hashlib").sha256(old.read_bytes()).hexdigest())
    with pytest.raises(UserError, match=r"is checkpoint format 0, and this Trainflow reads format 1"):
        train(variant(features, tmp_path / "c", resume_from=str(old)))
    # a one-cycle schedule (the shipped one) cannot be lengthened, nor a checkpoint continued on another schedule
    with pytest.raises(UserError, match=r"its onecycle schedule ends at step 22, and train.epochs=3 makes 33 steps"):
        train(variant(features, tmp_path / "d", resume_from=str(good), **{**RUN, "epochs": 3}))
    with pytest.raises(UserError, match=r"another learning rate schedule than train.schedule=cosine; set train.schedule"):
        train(variant(features, tmp_path / "d", resume_from=str(good), **{**RUN, "schedule": "cosine"}))
    # continuing a finished cosine run for more epochs from its last checkpoint works
    cosine = dict(RUN, schedule="cosine")
    train(variant(features, tmp_path / "e", **cosine))
    last = tmp_path / "e/model/checkpoints" / f"step-{summary['steps']:08d}.pt"
    more = train(variant(features, tmp_path / "f", resume_from=str(last), **{**cosine, "epochs": 3}))
    assert more["resumed_from"]["epoch"] == 3 and [e["epoch"] for e in more["epochs"]] == [1, 2, 3]


def test_prefect_retries_a_stage_only_after_an_infrastructure_failure():
    from distributed import KilledWorker
    from prefect.states import Failed

    from flows.stages import infrastructure_failure

    def retried(error):
        return infrastructure_failure(None, None, Failed(data=error))

    assert retried(KilledWorker("task", "worker", 3)) and retried(ConnectionResetError()) and retried(TimeoutError())
    assert retried(InfrastructureError("Dask worker tcp://10.0.0.7:40000 running rank 1 was lost"))
    # training relaunched its ranks itself, up to train.max_restarts: Prefect does not multiply those attempts
    assert not retried(
        RestartsExhausted("train: gave up after 3 restart(s) (train.max_restarts): #1 infrastructure: rank 1 killed")
    )
    assert not retried(UserError("validate: data/raw/data.parquet failed 2 of 29 expectations"))  # bad data
    assert not retried(ZeroDivisionError("division by zero"))  # a bug: the same again


def on_dask(s, root: Path, address: str, **train_overrides):
    return on_cluster(s, root, address, **{**RUN, **train_overrides})


def test_a_lost_dask_worker_is_replaced_and_its_group_resumes_to_the_same_parameters(features, uninterrupted, tmp_path):
    """The worker process running rank 1 SIGKILLs itself mid-epoch; its nanny starts a replacement, and the group is
    relaunched on it from the last checkpoint."""
    ref, ref_summary = uninterrupted
    with dask_gpu_cluster(tmp_path, gpu=2, **fault(f"kill:1:18:{tmp_path / 'fired'}")) as address:
        with Client(address, timeout=10) as c:
            before = set(cluster_workers(c))
        summary = train(on_dask(features, tmp_path, address, rejoin_timeout_s=60))
    assert (tmp_path / "fired").exists()
    (failure,) = summary["restarts"]
    lost = re.fullmatch(
        r"Dask worker (\S+) running rank 1 was lost \(killed, out of memory, or its machine gone\)", failure["cause"]
    )
    assert failure["kind"] == "infrastructure" and lost and lost[1] in before
    assert lost[1] not in summary["placement"] and len(set(summary["placement"]) - before) == 1  # on the replacement
    assert summary["resumed_from"]["steps"] == 15 and summary["steps"] == ref_summary["steps"]
    same_parameters(ref / "model", tmp_path / "model", atol=1e-6)


def test_a_hung_rank_on_a_dask_worker_ends_its_worker_leaves_its_stacks_and_the_group_resumes(features, uninterrupted, tmp_path):
    """The hang watchdog of a rank on a Dask worker ends the worker process (a thread cannot be stopped); its
    nanny restarts it, the launcher names the hang and where the stacks are, and the group resumes."""
    ref, _ = uninterrupted
    with dask_gpu_cluster(tmp_path, gpu=2, **fault(f"hang:0:7:{tmp_path / 'fired'}")) as address:
        summary = train(on_dask(features, tmp_path, address, step_timeout_s=3))
    (failure,) = summary["restarts"]
    # rank 0 hangs before its step, rank 1 waits for it in the all-reduce: either watchdog may end its worker first
    hung = re.fullmatch(r"rank ([01]) on \S+ hung \(no step in train.step_timeout_s; stacks in (\S+)\)", failure["cause"])
    assert failure["kind"] == "infrastructure" and hung, failure["cause"]
    assert Path(hung[2]).name == f"hung-rank{hung[1]}.log"
    assert "(most recent call first)" in (tmp_path / "model" / Path(hung[2]).name).read_text()
    same_parameters(ref / "model", tmp_path / "model", atol=1e-6)


def test_without_a_replacement_the_group_goes_on_with_fewer_workers_only_when_elastic(features, uninterrupted, tmp_path):
    """Workers without a nanny: the one running rank 1 dies for good. Not elastic, the relaunch finds 1 of 2 GPU
    workers and the run stops with its failures, checkpoints kept; elastic, it resumes on the one left."""
    ref, ref_summary = uninterrupted
    with dask_gpu_cluster(tmp_path, gpu=2, nanny=False, **fault(f"kill:1:18:{tmp_path / 'fired'}")) as address:
        s = on_dask(features, tmp_path, address, rejoin_timeout_s=1, max_restarts=1)
        with pytest.raises(
            RestartsExhausted,
            match=r"train: gave up after 1 restart\(s\) \(train.max_restarts\): #1 infrastructure: "
            r"Dask worker \S+ running rank 1 was lost .*; #2 infrastructure: 1 of the 2 GPU "
            r"workers after waiting train.rejoin_timeout_s=1 s for replacements; train.elastic: "
            r"true would go on with fewer\. The checkpoints are kept",
        ):
            train(s)
        assert [p.name for p in listed(staging_dir(s.train.out_dir) / "checkpoints")][-1] == "step-00000015.pt"
        summary = train(on_dask(features, tmp_path, address, rejoin_timeout_s=1, max_restarts=1, elastic=True))
    assert summary["world_size"] == 1 and len(summary["placement"]) == 1 and summary["restarts"] == []
    assert summary["resumed_from"]["steps"] == 15 and summary["steps"] == ref_summary["steps"]
    # the same global batches, one rank instead of two: the same parameters up to the order of float sums
    same_parameters(ref / "model", tmp_path / "model", atol=1e-5)
    assert summary["epochs"][-1]["train_loss"] == pytest.approx(ref_summary["epochs"][-1]["train_loss"], rel=1e-5)


def test_under_torchrun_a_sigkilled_rank_restarts_the_group_to_the_same_parameters(
    features, uninterrupted, tmp_path, monkeypatch
):
    ref, ref_summary = uninterrupted
    inject(monkeypatch, f"kill:1:18:{tmp_path / 'fired'}")
    summary = train(variant(features, tmp_path, launcher="torchrun", **RUN))
    assert (tmp_path / "fired").exists()
    assert [(r["kind"], r["cause"]) for r in summary["restarts"]] == [
        ("infrastructure", "torchrun rank 1 killed by SIGKILL (out of memory?)")
    ]
    assert summary["resumed_from"]["steps"] == 15 and summary["steps"] == ref_summary["steps"]
    same_parameters(ref / "model", tmp_path / "model", atol=1e-6)


def test_resuming_cuts_the_dvclive_log_back_to_the_checkpoint_and_drops_what_a_kill_left_half_written(tmp_path):
    from tasks.training.live import trim_live

    metrics = tmp_path / "plots/metrics"
    (metrics / "train").mkdir(parents=True)
    (metrics / "train/loss.tsv").write_text("step\tloss\n1\t1.0\n2\t0.5\n3\t0.4\n4\t0.")
    (metrics / "lr.tsv").write_text("")  # killed as dvclive created it
    (metrics / "perf.tsv").write_text("st")
    trim_live(tmp_path, 2)  # resuming at the checkpoint after epoch 2
    assert (metrics / "train/loss.tsv").read_text() == "step\tloss\n1\t1.0\n2\t0.5\n"
    assert sorted(p.name for p in metrics.rglob("*.tsv")) == ["loss.tsv"]
