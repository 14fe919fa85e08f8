"""Gradient sync modes and gradient accumulation on real 2-rank gloo process groups."""


import pytest

from tasks.evaluate import evaluate
from tasks.settings import UserError
from tasks.train import train
from tests.conftest import same_parameters, variant


def test_accumulated_micro_batches_give_the_same_step(features, tmp_path):
    """2 ranks x 4 micro-batches (synced once per step) = 1 process with the whole batch, to 1e-5."""
    one = variant(features, tmp_path / "one", world_size=1, epochs=2, dropout=0.0)
    accum = variant(features, tmp_path / "accum", world_size=2, grad_accum_steps=4, epochs=2, dropout=0.0)
    assert train(one)["steps"] == train(accum)["steps"]
    same_parameters(tmp_path / "one/model", tmp_path / "accum/model", atol=1e-5)


@pytest.fixture(scope="module")
def baseline(features, tmp_path_factory):
    s = variant(features, tmp_path_factory.mktemp("allreduce"), world_size=2, epochs=25, hidden=[64, 64], lr=0.005)
    train(s)
    return evaluate(s)["rmse"]


@pytest.mark.parametrize("mode", ["fp16", "bf16", "powersgd", "local_sgd"])
def test_each_grad_sync_mode_converges_near_allreduce(features, baseline, tmp_path, mode):
    s = variant(features, tmp_path, world_size=2, epochs=25, hidden=[64, 64], lr=0.005, grad_sync=mode)
    train(s)
    rmse = evaluate(s)["rmse"]
    assert rmse <= baseline * 1.05, f"{mode}: test RMSE {rmse:.4f} vs allreduce {baseline:.4f}"


def test_more_micro_batches_than_rows_per_rank_are_refused(features, tmp_path):
    with pytest.raises(UserError, match="train.grad_accum_steps=64 micro-batches; raise train.batch_size"):
        train(variant(features, tmp_path, world_size=2, batch_size=64, grad_accum_steps=64))
