"""Gradient sync modes and gradient accumulation on real 2-rank gloo process groups."""

import pytest

from tasks.settings import UserError
from tasks.train import train
from tests.conftest import same_parameters, variant

pytestmark = pytest.mark.slow  # real clusters, servers, flows or several ranks: `make test-fast` skips them


def test_accumulated_micro_batches_give_the_same_step(features, tmp_path):
    """2 ranks x 4 micro-batches (synced once per step) = 1 process with the whole batch, to 1e-5."""
    one = variant(features, tmp_path / "one", world_size=1, epochs=2, dropout=0.0)
    accum = variant(features, tmp_path / "accum", world_size=2, grad_accum_steps=4, epochs=2, dropout=0.0)
    assert train(one)["steps"] == train(accum)["steps"]
    same_parameters(tmp_path / "one/model", tmp_path / "accum/model", atol=1e-5)


@pytest.mark.parametrize("mode", ["fp16", "bf16", "powersgd", "local_sgd"])
def test_each_grad_sync_mode_trains_on_two_ranks(features, tmp_path, mode):
    """A smoke test of each communication hook (and local SGD's averaging) on a real 2-rank group: it trains, its
    sync time is measured, and after 2 epochs it is close to exact all-reduce. How near each converges over a
    longer run is a benchmark: bench/train.py (c)."""
    summary = train(variant(features, tmp_path, world_size=2, epochs=2, grad_sync=mode, dropout=0.0))
    exact = train(variant(features, tmp_path / "exact", world_size=2, epochs=2, dropout=0.0)) if mode == "fp16" else None
    assert summary["epochs_run"] == 2 and 0 < summary["best_val_rmse"] < 1.2  # learned something (the std is ~1.15)
    assert all(e["sync_s"] is not None and e["sync_s"] >= 0 for e in summary["epochs"])
    if exact is not None:  # fp16 all-reduce rounds gradients: the same training to about 1e-3
        assert summary["best_val_rmse"] == pytest.approx(exact["best_val_rmse"], rel=1e-2)


def test_more_micro_batches_than_rows_per_rank_are_refused(features, tmp_path):
    with pytest.raises(UserError, match="train.grad_accum_steps=64 micro-batches; raise train.batch_size"):
        train(variant(features, tmp_path, world_size=2, batch_size=64, grad_accum_steps=64))
