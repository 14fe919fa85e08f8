import json
from pathlib import Path

import pytest
import torch

from tasks.model import load_model
from tasks.settings import UserError
from tasks.train import train
from tests.conftest import variant


def test_two_rank_gloo_ddp_matches_one_process(features, tmp_path):
    """k steps on 2 ranks (global batch B) give the parameters of k steps in one process with batch B."""
    one = variant(features, tmp_path / "one", world_size=1, epochs=2, patience=5)
    two = variant(features, tmp_path / "two", world_size=2, epochs=2, patience=5, keep_checkpoints=1)
    s1, s2 = train(one), train(two)
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    n_train = json.loads((Path(features.preprocess.out_dir) / "schema.json").read_text())["rows"]["train"]
    assert s1["steps"] == s2["steps"] == 2 * -(-n_train // 128)  # the last, partial batch is trained too
    m1, _ = load_model(tmp_path / "one/model/model.pt")
    m2, _ = load_model(tmp_path / "two/model/model.pt")
    for (name, p1), (_, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        torch.testing.assert_close(p1, p2, atol=1e-5, rtol=0, msg=name)
    # rank 0 alone wrote: one model, the last checkpoint kept, dvclive metrics for 2 epochs
    assert sorted(p.name for p in (tmp_path / "two/model/checkpoints").iterdir()) == ["epoch-0002.pt"]
    live = json.loads((tmp_path / "two/live/metrics.json").read_text())
    assert live["step"] == 1 and live["val"]["rmse"] > 0


def test_training_learns_and_stops_early(features, tmp_path):
    s = variant(features, tmp_path, epochs=200, patience=3, lr=0.01)
    summary = train(s)
    assert summary["epochs_run"] < 200  # early stopping fired
    assert summary["best_epoch"] == summary["epochs_run"] - 3
    assert summary["best_val_rmse"] < 0.75  # target std is ~1.15; a trained model does far better
    ckpt = torch.load(tmp_path / "model/checkpoints" / f"epoch-{summary['epochs_run']:04d}.pt", weights_only=True)
    assert ckpt["epoch"] == summary["epochs_run"] and set(ckpt) >= {"model", "optimizer", "scheduler"}


def test_batch_larger_than_train_split_is_refused_and_old_model_kept(features, tmp_path):
    s = variant(features, tmp_path, epochs=1)
    train(s)
    before = (tmp_path / "model/model.pt").read_bytes()
    with pytest.raises(UserError, match=r"train.batch_size=100000 exceeds the 1,3\d\d training rows"):
        train(variant(features, tmp_path, batch_size=100_000))
    assert (tmp_path / "model/model.pt").read_bytes() == before


@pytest.mark.parametrize("world_size", [1, 2])
def test_diverging_loss_stops_naming_the_step_the_rank_and_the_key(features, tmp_path, world_size):
    with pytest.raises(UserError, match=r"loss became (nan|inf) at step \d+ \(epoch 1\) on rank [01]; .* keeps the last good "
                                        r"model\. Lower train.lr \(now 10.0\)"):
        # AdamW scales weights by -9 a step
        train(variant(features, tmp_path, lr=10.0, weight_decay=1.0, epochs=3, world_size=world_size))
