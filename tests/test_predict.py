"""Batch inference from a package: validation with the packaged suite, rejects with reasons, counts that add
up, the row key, Dask for inputs of several partitions, the CLI and the Prefect flow."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.predict import predict_file
from tasks.settings import UserError
from tests.conftest import ROOT, load_package


@pytest.fixture(scope="module")
def raw_test(packaged) -> pd.DataFrame:
    return pd.read_parquet(Path(packaged[2].preprocess.out_dir) / "test_raw")


def test_bad_rows_go_to_rejects_with_reasons_and_the_counts_add_up(packaged, raw_test, tmp_path):
    s = packaged[2]
    frame = raw_test.copy()
    frame.loc[3, "MedInc"] = np.nan  # the suite allows no missing MedInc
    frame.loc[7, "Latitude"] = 99.0  # outside California
    frame.loc[8, ["HouseAge", "Latitude"]] = [-5.0, 10.0]
    frame = frame[list(reversed(frame.columns))]  # any column order; the target column present and ignored
    frame.to_parquet(tmp_path / "in.parquet", index=False)
    out = predict_file(s.package.out_dir, tmp_path / "in.parquet", tmp_path / "pred.parquet")
    assert (out["rows"], out["predicted"], out["rejected"]) == (len(frame), len(frame) - 3, 3)
    rejects = pd.read_parquet(tmp_path / "pred.rejects.parquet")
    assert rejects["_row"].tolist() == [3, 7, 8]
    assert rejects["_reason"].tolist() == [
        "MedInc: expect_column_values_to_not_be_null",
        "Latitude: expect_column_values_to_be_between",
        "HouseAge: expect_column_values_to_be_between; Latitude: expect_column_values_to_be_between",
    ]
    pred = pd.read_parquet(tmp_path / "pred.parquet")
    assert list(pred.columns) == ["_row", "prediction"] and 3 not in set(pred["_row"])  # no key: the row number
    good = raw_test.drop(index=[3, 7, 8])
    np.testing.assert_allclose(pred["prediction"], load_package(s.package.out_dir).predict(good), rtol=0, atol=1e-6)


def test_partitions_on_dask_give_the_single_pass_result(packaged, raw_test, tmp_path, monkeypatch):
    s = packaged[2]
    parts = tmp_path / "parts"
    parts.mkdir()
    for i, start in enumerate(range(0, len(raw_test), -(-len(raw_test) // 3))):
        chunk = raw_test.iloc[start : start + -(-len(raw_test) // 3)]
        chunk.assign(MedInc=chunk["MedInc"].where(chunk.index % 500 != 1)).to_parquet(parts / f"part-{i}.parquet", index=False)
    whole = predict_file(s.package.archive, parts / "part-0.parquet", tmp_path / "one.csv")  # CSV out, from the .tar.gz
    assert whole["mode"] == "in memory"
    monkeypatch.setattr("tasks.predict.PARTITION_ROWS", 500)
    out = predict_file(s.package.out_dir, parts, tmp_path / "all.parquet")
    assert out["mode"] == "3 partitions on Dask" and out["predicted"] + out["rejected"] == len(raw_test)
    rejects = pd.read_parquet(tmp_path / "all.rejects.parquet")
    assert rejects["_row"].tolist() == [i for i in range(len(raw_test)) if i % 500 == 1]  # global row numbers
    merged = pd.read_parquet(tmp_path / "all.parquet")
    expected = load_package(s.package.out_dir).predict(raw_test.drop(index=rejects["_row"]))
    np.testing.assert_allclose(merged["prediction"], expected, rtol=0, atol=1e-6)
    first = pd.read_csv(tmp_path / "one.csv")
    np.testing.assert_allclose(first["prediction"], merged["prediction"][: len(first)], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.drop(columns="Latitude"), r"lacks \['Latitude'\]; the package expects"),
        (lambda f: f.assign(note="x"), r"has columns the model does not know: \['note'\]"),
        (
            lambda f: f.assign(HouseAge=f["HouseAge"].astype(str).where(f.index != 4, "twelve")),
            r"column HouseAge should be float but holds 1 values that are not numbers, e.g. row 4: 'twelve'",
        ),
        (lambda f: f.head(0), r"has no rows to score"),
    ],
)
def test_bad_input_is_refused_with_a_message(packaged, raw_test, tmp_path, change, message):
    change(raw_test.copy()).to_parquet(tmp_path / "in.parquet", index=False)
    with pytest.raises(UserError, match=message):
        predict_file(packaged[2].package.out_dir, tmp_path / "in.parquet", tmp_path / "pred.parquet")
    assert not (tmp_path / "pred.parquet").exists()


def test_cli_scores_a_csv_and_refuses_a_tampered_package(packaged, raw_test, tmp_path):
    import shutil

    raw_test.head(50).to_csv(tmp_path / "in.csv", index=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tasks.predict", packaged[2].package.out_dir, str(tmp_path / "in.csv"), str(tmp_path / "p.csv")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("50 rows: 50 predicted -> ") and len(pd.read_csv(tmp_path / "p.csv")) == 50
    shutil.copytree(packaged[2].package.out_dir, tmp_path / "pkg")
    (tmp_path / "pkg/suite.yaml").write_text("columns: {}\n")
    cmd[3] = str(tmp_path / "pkg")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert (
        done.returncode == 2 and "suite.yaml does not match its sha256 in manifest.json; the package was altered" in done.stderr
    )


def test_batch_predict_flow(packaged, raw_test, tmp_path):
    from flows.predict import batch_predict

    raw_test.head(100).to_parquet(tmp_path / "in.parquet", index=False)
    state = batch_predict(
        packaged[2].package.out_dir, str(tmp_path / "in.parquet"), str(tmp_path / "out.parquet"), return_state=True
    )
    assert state.is_completed()
    assert state.result()["predicted"] == 100 and len(pd.read_parquet(tmp_path / "out.parquet")) == 100
