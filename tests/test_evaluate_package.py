import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.evaluate import evaluate
from tasks.files import sha256_file
from tasks.settings import UserError
from tests.conftest import ROOT, load_package, parse, workspace


def test_evaluate_writes_metrics_predictions_and_plot(packaged):
    metrics, _, s = packaged
    out = Path(s.evaluate.out_dir)
    test_rows = json.loads((Path(s.preprocess.out_dir) / "schema.json").read_text())["rows"]["test"]
    assert metrics["n"] == test_rows
    assert 0 < metrics["mae"] < metrics["rmse"] < 0.9  # target std ~1.15: the model must beat the mean
    assert 0.4 < metrics["r2"] < 1
    assert json.loads((out / "metrics.json").read_text()) == metrics
    preds = pd.read_csv(out / "predictions.csv")
    assert list(preds.columns) == ["actual", "predicted"] and len(preds) == test_rows
    rmse = float(np.sqrt(((preds.predicted - preds.actual) ** 2).mean()))
    assert rmse == pytest.approx(metrics["rmse"], rel=1e-6)
    assert (out / "figures" / "pred_vs_actual.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_package_reproduces_evaluate_from_raw_rows(packaged):
    _, result, s = packaged
    pkg = load_package(s.package.out_dir)
    raw_test = pd.read_parquet(Path(s.preprocess.out_dir) / "test_raw")
    expected = pd.read_csv(Path(s.evaluate.out_dir) / "predictions.csv")["predicted"].to_numpy()
    np.testing.assert_allclose(pkg.predict(raw_test), expected, atol=1e-5, rtol=0)
    assert result["parity_max_abs_diff"] <= 1e-5
    manifest = pkg.manifest
    assert set(manifest["files"]) == {"model.onnx", "transform.json", "suite.yaml", "MODEL_CARD.md", "model.pt"}
    assert manifest["files"]["model.pt"] == sha256_file(Path(s.train.out_dir) / "model.pt")  # what a warm start loads
    assert manifest["metrics"]["rmse"] == packaged[0]["rmse"]
    assert manifest["params"]["train"]["hidden"] == [32, 32]
    assert len(manifest["data"]["raw"]["sha256"]) == 64 and manifest["torch_version"]
    onnx_bytes = (Path(s.package.out_dir) / "model.onnx").read_bytes()  # reproducible: no stack traces, no paths of this machine
    assert b"stack_trace" not in onnx_bytes and str(ROOT).encode() not in onnx_bytes and b"/tmp/" not in onnx_bytes


def test_tampered_package_is_refused(packaged, tmp_path):
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(packaged[2].package.out_dir, copy)
    with open(copy / "transform.json", "a") as f:
        f.write(" ")
    with pytest.raises(UserError, match="transform.json does not match its sha256"):
        load_package(copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(UserError, match="model.onnx is missing"):
        load_package(copy)


def test_predict_names_missing_columns(packaged):
    pkg = load_package(packaged[2].package.out_dir)
    with pytest.raises(UserError, match=r"lacks columns \['Latitude'\]"):
        pkg.predict(pd.read_parquet(Path(packaged[2].preprocess.out_dir) / "test_raw").drop(columns="Latitude"))


def test_evaluate_without_a_model_names_the_stage_to_run(tmp_path):
    s = workspace(tmp_path)
    with pytest.raises(UserError, match="model.pt does not exist; run the train stage"):
        evaluate(s)


def test_a_foreign_model_file_is_never_unpickled(trained, tmp_path):
    import pickle

    raw = trained.model_dump(by_alias=True)
    raw["train"]["out_dir"] = str(tmp_path)
    (tmp_path / "model.pt").write_bytes(pickle.dumps(Path("/etc/passwd")))
    with pytest.raises(UserError, match="is not a Trainflow model file"):
        evaluate(parse(raw))
