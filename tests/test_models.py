"""What a model predicts and how it is built, beyond the built-in regressor: a log-transformed target (trained in
log units, predicted and scored in the target's), a model of one's own from a factory (the FT-Transformer example
through DDP, evaluation and the package; factories that break the contract refused by name), and the gate's
refusal to compare models of different things."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.errors import UserError
from tasks.evaluate import evaluate
from tasks.ingest import ingest
from tasks.package import package
from tasks.preprocess import preprocess
from tasks.promote import promote
from tasks.train import train
from tasks.validate import validate
from tests.conftest import ROOT, cli_root, load_package, parse, real_slice, same_parameters, variant, workspace

FT = "tasks.training.ft_transformer:build"


def run_all(s) -> dict:
    for stage in (ingest, validate, preprocess, train):
        stage(s)
    return evaluate(s) | {"package": package(s)}


@pytest.fixture(scope="module")
def plain_and_log(tmp_path_factory):
    """The same slice trained on the target as it is and on log(target)."""
    root = tmp_path_factory.mktemp("transform")
    train_ = dict(train__epochs=8, train__lr=0.01)
    plain = workspace(root / "plain", **train_)
    logged = workspace(root / "log", dataset__target_transform="log", **train_)
    return plain, run_all(plain), logged, run_all(logged)


def test_a_log_target_moves_no_row_and_is_scored_in_the_targets_units(plain_and_log):
    plain, m_plain, logged, m_log = plain_and_log
    raw = {name: pd.read_parquet(Path(s.preprocess.out_dir) / "test_raw") for name, s in (("plain", plain), ("log", logged))}
    pd.testing.assert_frame_equal(raw["plain"], raw["log"])  # the split hashes the features, not the target
    transform = json.loads((Path(logged.preprocess.out_dir) / "transform.json").read_text())
    y = raw["log"]["MedHouseVal"].to_numpy()
    assert transform["target_transform"] == "log" and transform["target_mean"] == pytest.approx(np.log(y).mean(), abs=0.1)
    predicted = pd.read_csv(Path(logged.evaluate.out_dir) / "predictions.csv")["predicted"].to_numpy()
    assert predicted.min() > 0.1 and predicted.max() < 10  # $100k units, not log units
    assert set(m_log) >= {"rmse", "mae", "r2", "mape", "rmse_transformed"} and "rmse_transformed" not in m_plain
    assert 0.5 < m_log["rmse"] / m_plain["rmse"] < 1.5 and m_log["rmse_transformed"] < 0.5  # comparable in dollars
    assert m_log["rmse_transformed"] == pytest.approx(np.sqrt(np.mean((np.log(predicted) - np.log(y)) ** 2)), rel=1e-6)
    # the package inverts the transform inside the ONNX graph
    pkg = load_package(logged.package.out_dir)
    np.testing.assert_allclose(pkg.predict(raw["log"]), predicted, rtol=1e-5)
    assert pkg.manifest["target_transform"] == "log" and m_log["package"]["parity_max_abs_diff"] < 1e-4


def test_the_gate_refuses_a_champion_of_another_target_scale(plain_and_log, tmp_path):
    """The issue's case: a log-price model must not be promoted over a dollar-price champion (nor compared)."""
    plain, _, logged, _ = plain_and_log
    champion = tmp_path / "production"
    first = parse(dict(plain.model_dump(by_alias=True), evaluate=dict(plain.evaluate.model_dump(), champion=str(champion))))
    evaluate(first)
    package(first)
    assert promote(first)["promoted"]
    before, gate_before = os.readlink(champion), (Path(logged.evaluate.out_dir) / "gate.json").read_bytes()
    raw = logged.model_dump(by_alias=True)
    raw["evaluate"]["champion"] = str(champion)
    proc = subprocess.run([sys.executable, "-m", "tasks.evaluate"], cwd=cli_root(parse(raw)), capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr  # one line
    assert 'predicts something else (target_transform: champion "none" vs this run "log")' in proc.stderr
    assert "Switch datasets with `trainflow use NAME`" in proc.stderr
    assert os.readlink(champion) == before and (Path(logged.evaluate.out_dir) / "gate.json").read_bytes() == gate_before


def test_the_gate_refuses_a_champion_of_another_dataset(plain_and_log, tmp_path):
    plain, _, logged, _ = plain_and_log
    champion = tmp_path / "production"
    first = parse(dict(plain.model_dump(by_alias=True), evaluate=dict(plain.evaluate.model_dump(), champion=str(champion))))
    evaluate(first)
    package(first)
    promote(first)
    raw = plain.model_dump(by_alias=True)
    raw["dataset"]["name"], raw["evaluate"]["champion"] = "other_housing", str(champion)
    with pytest.raises(
        UserError, match=r"predicts something else \(dataset: champion \"california_housing\" vs this run \"other_housing\"\)"
    ):
        evaluate(parse(raw))


def test_a_non_positive_target_with_a_log_transform_is_refused(tmp_path):
    frame = real_slice().assign(MedHouseVal=lambda f: f.MedHouseVal - 1.0)  # some values <= 0
    bad = int((frame.MedHouseVal <= 0).sum())
    suite = tmp_path / "suite.yaml"
    shutil.copy(ROOT / "data/suites/california_housing.yaml", suite)
    suite.write_text(suite.read_text().replace("MedHouseVal: {type: float, min: 0.1, max: 5.5}", "MedHouseVal: {type: float}"))
    s = workspace(tmp_path, frame, dataset__target_transform="log", dataset__suite=str(suite))
    ingest(s)
    validate(s)
    with pytest.raises(UserError, match=rf"dataset.target_transform=log: {bad:,} rows of 'MedHouseVal' are not > 0 .* use log1p"):
        preprocess(s)
    assert not Path(s.preprocess.out_dir).exists()


def test_a_model_of_ones_own_trains_under_ddp_and_packages(features, tmp_path):
    """The FT-Transformer example: 2 ranks = 1 process, then evaluation and an ONNX package with parity."""
    one = variant(features, tmp_path / "one", model=FT, hidden=[16, 16], world_size=1, epochs=2, patience=5)
    two = variant(features, tmp_path / "two", model=FT, hidden=[16, 16], world_size=2, epochs=2, patience=5)
    s1, s2 = train(one), train(two)
    assert s1["steps"] == s2["steps"]
    same_parameters(tmp_path / "one/model", tmp_path / "two/model", atol=1e-5)
    raw = one.model_dump(by_alias=True)
    raw["package"].update(out_dir=str(tmp_path / "package"), archive=str(tmp_path / "package.tar.gz"))
    s = parse(raw)
    m = evaluate(s)
    assert m["rmse"] < 1.0  # learned something in 2 epochs (the target's std is ~1.15)
    assert package(s)["parity_max_abs_diff"] < 1e-4


BROKEN = """
import torch
from torch import nn

def wrong_shape(schema, settings):
    return nn.Linear(schema["n_features"], 3)  # (batch, 3) for a regression

def raises(schema, settings):
    raise ValueError("no GPU here")

def not_a_module(schema, settings):
    return "mlp"

class FixedBatch(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.linear = nn.Linear(n, 1)

    def forward(self, x):
        return self.linear(x).reshape(len(x))  # len(): the exported graph takes this batch size only

def fixed_batch(schema, settings):
    return FixedBatch(schema["n_features"])
"""


@pytest.mark.parametrize(
    "model, message",
    [
        (
            "broken_models:wrong_shape",
            r"train.model=broken_models:wrong_shape: the module returned \(4, 3\) for a batch of 4 rows; "
            r"a regression model must return a tensor of shape \(4,\)",
        ),
        ("broken_models:raises", r"train.model=broken_models:raises: the factory raised ValueError: no GPU here"),
        (
            "broken_models:not_a_module",
            r"train.model=broken_models:not_a_module: the factory returned str, not a torch.nn.Module",
        ),
        ("broken_models:absent", r"train.model=broken_models:absent: broken_models has no callable 'absent'"),
        ("no_such_module:build", r"train.model=no_such_module:build: cannot import no_such_module \(ModuleNotFoundError"),
        (
            "broken_models:fixed_batch",
            r"train.model=broken_models:fixed_batch: the module \(FixedBatch, .*\) cannot be exported to ONNX for any batch size",
        ),
    ],
)
def test_a_factory_that_breaks_the_contract_is_refused_by_name(features, tmp_path, monkeypatch, model, message):
    (tmp_path / "broken_models.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("broken_models", None)
    with pytest.raises(UserError, match=message):
        train(variant(features, tmp_path, model=model, epochs=1))
    assert not (tmp_path / "model/model.pt").exists()


@pytest.mark.parametrize("kind", ["piecewise_linear", "periodic"])
def test_numeric_embeddings_train_on_two_ranks_like_one_process_and_export_to_onnx(features, tmp_path, kind):
    """train.numeric_embedding: 2 ranks = 1 process to 1e-5; the piecewise-linear bins are the train split's
    quantiles, saved with the weights; the ONNX package reproduces torch to 1e-5."""
    import onnxruntime as ort
    import torch

    from tasks.training.data import load_split
    from tasks.training.model import load_model, servable

    emb = dict(numeric_embedding=kind, embedding_bins=8, embedding_dim=4, schedule="cosine", epochs=2, patience=5)
    one = variant(features, tmp_path / "one", world_size=1, **emb)
    two = variant(features, tmp_path / "two", world_size=2, **emb)
    s1, s2 = train(one), train(two)
    assert s1["steps"] == s2["steps"] and s1["best_val_rmse"] < 1.0
    same_parameters(tmp_path / "one/model", tmp_path / "two/model", atol=1e-5)

    feat = Path(features.preprocess.out_dir)
    schema = json.loads((feat / "schema.json").read_text())
    x_train, _ = load_split(feat / "train", schema["features"], schema["target"])
    model, meta = load_model(tmp_path / "one/model/model.pt")
    assert meta["arch"]["numeric"] == {"kind": kind, "bins": 8, "dim": 4}
    if kind == "piecewise_linear":
        edges = model.inputs.numeric.encode.edges  # (numeric columns, bins + 1), from the saved state
        assert edges.shape == (x_train.shape[1], 9) and bool((edges.diff(dim=1) >= 0).all())
        torch.testing.assert_close(edges[:, 0], x_train.min(0).values, rtol=0, atol=0)
        torch.testing.assert_close(edges[:, -1], x_train.max(0).values, rtol=0, atol=0)
        torch.testing.assert_close(edges[:, 4], x_train.sort(0).values[round(0.5 * (len(x_train) - 1))], rtol=0, atol=0)

    raw = one.model_dump(by_alias=True)
    raw["package"].update(out_dir=str(tmp_path / "package"), archive=str(tmp_path / "package.tar.gz"))
    s = parse(raw)
    evaluate(s)
    assert package(s)["parity_max_abs_diff"] < 1e-5
    x_test, _ = load_split(feat / "test", schema["features"], schema["target"])
    wide = torch.cat([x_test, x_test * 3])  # beyond the outer edges too (the first and last bins are open)
    session = ort.InferenceSession(str(tmp_path / "package/model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"features": wide.numpy()})
    with torch.no_grad():
        torch_out = servable(model, meta)[0](wide).numpy()
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-5, rtol=0)


def test_a_zero_width_end_bin_of_a_piecewise_linear_encoding_is_a_step():
    """Repeated quantiles at both ends (a discrete column: months 1 to 8): a value past the train range (month 12,
    appended later) encodes like the largest train value, not as (12 - 8) / 1e-9."""
    import torch

    from tasks.training.model import PiecewiseLinear

    encode = PiecewiseLinear(1, 4)
    encode.fit(torch.tensor([[1.0], [1.0], [2.0], [2.0], [2.0]]))  # edges 1, 1, 2, 2, 2
    out = encode(torch.tensor([[0.0], [1.5], [2.0], [12.0]])).squeeze(1)
    assert out.tolist() == [[0, 0, 0, 0], [1, 0.5, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
