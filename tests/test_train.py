import json
from pathlib import Path

import pytest
import torch

from tasks.settings import UserError
from tasks.train import train
from tasks.training.data import rank_slice
from tests.conftest import same_parameters, variant


def test_two_rank_gloo_ddp_matches_one_process(features, tmp_path):
    """k steps on 2 ranks (global batch B) give the parameters of k steps in one process with batch B."""
    one = variant(features, tmp_path / "one", world_size=1, epochs=2, patience=5)
    two = variant(features, tmp_path / "two", world_size=2, epochs=2, patience=5, keep_checkpoints=1)
    s1, s2 = train(one), train(two)
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    n_train = json.loads((Path(features.preprocess.out_dir) / "schema.json").read_text())["rows"]["train"]
    assert s1["steps"] == s2["steps"] == 2 * -(-n_train // 128)  # the last, partial batch is trained too
    same_parameters(tmp_path / "one/model", tmp_path / "two/model", atol=1e-5)
    # rank 0 alone wrote: one model, the last checkpoint kept, dvclive metrics for 2 epochs
    assert sorted(p.name for p in (tmp_path / "two/model/checkpoints").iterdir()) == ["step-00000022.pt", "step-00000022.sha256"]
    live = json.loads((tmp_path / "two/live/metrics.json").read_text())
    assert live["step"] == 2 and live["val"]["rmse"] > 0  # epoch 2 of 2


def test_training_learns_and_stops_early(features, tmp_path):
    s = variant(features, tmp_path, epochs=200, patience=3, lr=0.01)
    summary = train(s)
    assert summary["epochs_run"] < 200  # early stopping fired
    assert summary["best_epoch"] == summary["epochs_run"] - 3
    assert summary["best_val_rmse"] < 0.75  # target std is ~1.15; a trained model does far better
    ckpt = torch.load(tmp_path / "model/checkpoints" / f"step-{summary['steps']:08d}.pt", weights_only=True)
    assert ckpt["epoch"] == summary["epochs_run"] + 1 and ckpt["step_in_epoch"] == 0  # the next epoch, from its start
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "order_state", "rng", "best", "history"}


def test_batch_larger_than_train_split_is_refused_and_old_model_kept(features, tmp_path):
    s = variant(features, tmp_path, epochs=1)
    train(s)
    before = (tmp_path / "model/model.pt").read_bytes()
    with pytest.raises(UserError, match=r"train.batch_size=100000 exceeds the 1,3\d\d training rows"):
        train(variant(features, tmp_path, batch_size=100_000))
    assert (tmp_path / "model/model.pt").read_bytes() == before


@pytest.mark.parametrize("world_size", [1, 2])
def test_diverging_loss_stops_naming_the_step_the_rank_and_the_key(features, tmp_path, world_size):
    with pytest.raises(
        UserError,
        match=r"loss became (nan|inf) at step \d+ \(epoch 1\) on rank [01]; .* keeps the last good "
        r"model\. Lower train.lr \(now 10.0\)",
    ):
        # AdamW scales weights by -9 a step
        train(variant(features, tmp_path, lr=10.0, weight_decay=1.0, epochs=3, world_size=world_size))


def test_bf16_autocast_trains_to_a_useful_model(features, tmp_path):
    summary = train(variant(features, tmp_path, precision="bf16", epochs=30, patience=30, lr=0.01))
    assert summary["precision"] == "bf16"
    assert summary["best_val_rmse"] < 0.8  # the target's std is ~1.15


def test_features_that_disagree_with_their_metadata_are_refused(features, tmp_path):
    """A categorical column whose codes do not fit the embedding the metadata sizes: a message, not a device assert."""
    import shutil

    from tests.conftest import parse

    feat = tmp_path / "features"
    shutil.copytree(features.preprocess.out_dir, feat)
    schema = json.loads((feat / "schema.json").read_text())
    schema["categorical"] = [{"name": "HouseAge", "index": 1, "cardinality": 3}]
    (feat / "schema.json").write_text(json.dumps(schema))
    raw = variant(features, tmp_path, epochs=1).model_dump(by_alias=True)
    raw["preprocess"]["out_dir"] = str(feat)
    with pytest.raises(
        UserError,
        match=r"feature 'HouseAge' holds code .* but schema.json gives it 3 categories .* the "
        r"features and their metadata disagree; rerun the preprocess stage",
    ):
        train(parse(raw))
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"strategy": "fsdp", "grad_sync": "powersgd"},
            "train: grad_sync=powersgd works with strategy ddp only .* set grad_sync: allreduce or strategy: ddp",
        ),
        ({"launcher": "dask"}, "train.launcher=dask places ranks on the GPU workers of an existing cluster: set dask.address"),
    ],
)
def test_settings_that_cannot_work_together_are_refused(features, tmp_path, monkeypatch, overrides, message):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with pytest.raises(UserError, match=message):
        variant(features, tmp_path, **overrides)


def test_more_local_ranks_than_cores_are_refused(features, tmp_path):
    import os

    n = (os.cpu_count() or 1) + 1
    with pytest.raises(UserError, match=rf"train.world_size={n} exceeds the {n - 1} CPU cores here \(one rank each\)"):
        train(variant(features, tmp_path, world_size=n, batch_size=512))


def test_compiled_model_trains_like_the_eager_one(features, tmp_path):
    """train.compile: torch.compile (inductor, a C++ build on CPU) gives the eager run's model to 1e-5."""
    eager = train(variant(features, tmp_path / "eager", epochs=2))
    compiled = train(variant(features, tmp_path / "compiled", epochs=2, compile=True))
    assert compiled["best_val_rmse"] == pytest.approx(eager["best_val_rmse"], abs=1e-5)
    same_parameters(tmp_path / "eager/model", tmp_path / "compiled/model", atol=1e-5)


@pytest.mark.parametrize("n, batch, world", [(1305, 128, 2), (1305, 128, 3), (10, 4, 3), (7, 7, 7)])
def test_ranks_take_disjoint_slices_that_cover_every_row_once_per_epoch(n, batch, world):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    taken = [rank_slice(perm[start : start + batch], r, world) for start in range(0, n, batch) for r in range(world)]
    assert sorted(torch.cat(taken).tolist()) == list(range(n))


@pytest.mark.parametrize("schedule", ["onecycle", "plateau"])
def test_a_schedule_resumes_mid_epoch_to_the_uninterrupted_parameters(features, tmp_path, schedule):
    """train.schedule: a run continued from a mid-epoch checkpoint (the scheduler's state in it) ends with the
    parameters and the per-epoch learning rates of the run that was never stopped."""
    run = dict(schedule=schedule, epochs=3, patience=2, lr=0.02, checkpoint_every="5 steps", keep_checkpoints=10)
    whole = train(variant(features, tmp_path / "whole", **run))
    middle = tmp_path / "whole/model/checkpoints/step-00000025.pt"  # epoch 3, step 3 of 11
    resumed = train(variant(features, tmp_path / "resumed", resume_from=str(middle), **run))
    assert resumed["resumed_from"]["steps"] == 25 and resumed["steps"] == whole["steps"] == 33
    assert [e["lr"] for e in resumed["epochs"]] == [e["lr"] for e in whole["epochs"]]
    same_parameters(tmp_path / "whole/model", tmp_path / "resumed/model", atol=1e-6)
    lrs = [e["lr"] for e in whole["epochs"]]
    if schedule == "onecycle":  # stepped per step: warm-up to train.lr (30% of the steps), then down to ~0
        state = torch.load(middle, weights_only=True)["scheduler"]
        assert state["total_steps"] == 33 and state["last_epoch"] == 25
        assert lrs[0] > 0.02 / 25 and lrs[-1] < 0.02 / 100
    else:  # constant until the validation loss stalls
        assert lrs[0] == 0.02 and all(b in (a, a / 2) for a, b in zip(lrs, lrs[1:]))


def test_the_plateau_schedule_halves_the_learning_rate_when_validation_stalls(features, tmp_path, capsys):
    summary = train(variant(features, tmp_path, schedule="plateau", lr=0.05, epochs=12, patience=3, dropout=0.0))
    lrs = [e["lr"] for e in summary["epochs"]]
    assert lrs[0] == 0.05 and min(lrs) < 0.05, lrs  # lowered at least once (patience 3 // 3 = 1: after 2 stalled epochs)
    assert "no better validation loss for 2 epochs; lr 0.05 -> 0.025" in capsys.readouterr().out
