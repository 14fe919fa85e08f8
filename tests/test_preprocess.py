import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.features import DATE_PARTS, HASH_BUCKETS, expand
from tasks.ingest import ingest
from tasks.preprocess import apply_transform, assign_split, preprocess
from tasks.settings import UserError
from tasks.validate import validate
from tests.conftest import real_slice, run_until_preprocess, workspace


def read(s, split):
    return pd.read_parquet(Path(s.preprocess.out_dir) / split)


def test_splits_cover_every_row_once_with_scaling_fitted_on_train(tmp_path):
    s = workspace(tmp_path, preprocess__scaler="standard")
    schema = run_until_preprocess(s)
    rows = schema["rows"]
    assert sum(rows.values()) == 2064 and schema["dropped_missing_target"] == 0
    assert rows["train"] / 2064 == pytest.approx(0.64, abs=0.04)
    assert rows["test"] / 2064 == pytest.approx(0.20, abs=0.04)
    train, val = read(s, "train"), read(s, "val")
    features = schema["features"]
    # fitted on train only: train is exactly standardised, val is not
    np.testing.assert_allclose(train[features].mean(), 0, atol=1e-5)
    np.testing.assert_allclose(train[features].std(), 1, atol=1e-4)
    assert np.abs(val[features].mean()).max() > 1e-3
    # the raw test rows map to the scaled test rows with the saved transform
    transform = json.loads((Path(s.preprocess.out_dir) / "transform.json").read_text())
    np.testing.assert_allclose(apply_transform(transform, read(s, "test_raw")), read(s, "test")[features], atol=1e-6)
    # the raw test rows are real input rows
    assert len(read(s, "test_raw").merge(real_slice(), how="inner")) == rows["test"]


def test_quantile_scaler_maps_train_to_a_standard_normal(tmp_path):
    s = workspace(tmp_path)
    run_until_preprocess(s)
    x = read(s, "train")[["MedInc", "AveOccup", "Population"]]
    np.testing.assert_allclose(x.mean(), 0, atol=0.05)
    np.testing.assert_allclose(x.std(), 1, atol=0.1)


def test_rerun_gives_identical_output(tmp_path):
    s = workspace(tmp_path)
    run_until_preprocess(s)
    first = {n: read(s, n) for n in ("train", "val", "test")}
    preprocess(s)
    for n, frame in first.items():
        pd.testing.assert_frame_equal(read(s, n), frame)


def test_split_of_a_row_does_not_depend_on_other_rows():
    raw = real_slice()
    fractions = (0.64, 0.16, 0.20)
    whole = assign_split(raw, fractions)
    appended = assign_split(pd.concat([raw, real_slice(7)], ignore_index=True), fractions)
    assert (appended.iloc[: len(raw)].to_numpy() == whole.to_numpy()).all()


def test_unknown_target_is_named_and_nothing_is_written(tmp_path):
    s = workspace(tmp_path, dataset__target="median_value")
    ingest(s)
    validate(s)
    with pytest.raises(UserError, match="dataset.target: column 'median_value' is not in"):
        preprocess(s)
    assert not Path(s.preprocess.out_dir).exists()


def test_refuses_data_that_failed_validation(tmp_path):
    frame = real_slice()
    frame.loc[0, "MedInc"] = -5.0
    s = workspace(tmp_path, frame)
    ingest(s)
    with pytest.raises(UserError):
        validate(s)
    with pytest.raises(UserError, match="failed validation"):
        preprocess(s)


def test_split_is_pandas_row_hash_of_the_key_whatever_the_string_dtype():
    """The split is the bucket of pandas' row hash of the key (text hashed as objects): outputs of before stay."""
    raw = real_slice().assign(region=lambda f: np.where(f.Latitude > 36, "north", None))
    key = raw[["HouseAge", "region"]]
    bucket = pd.util.hash_pandas_object(key.astype({"region": object}), index=False).to_numpy() % HASH_BUCKETS
    expected = np.where(bucket < 640_000, "train", np.where(bucket < 800_000, "val", "test"))
    for region in (object, "str", "string[pyarrow]"):
        split = assign_split(key.astype({"region": region}), (0.64, 0.16, 0.20))
        assert split.tolist() == expected.tolist(), region


def test_datetime_parts_parse_each_distinct_value_as_the_whole_column_would():
    stamps = [
        "2013-01-01T05:00:00Z",
        None,
        "not a time",
        "2013-01-01T05:00:00Z",
        "2014-02-03T01:00:00+01:00",
        "2013-12-31T23:00:00Z",
    ]
    for col in (
        pd.Series(stamps * 50, dtype=object),
        pd.Series(stamps * 50, dtype="str"),
        pd.Series(pd.to_datetime(stamps[:2] * 50)),
    ):
        got = expand(pd.DataFrame({"t": col}), {"t": "datetime"})
        t = pd.to_datetime(col, utc=True, errors="coerce")
        for p in DATE_PARTS:
            np.testing.assert_array_equal(got[f"t__{p}"].to_numpy(), getattr(t.dt, p).astype("float64").to_numpy(), err_msg=p)
    assert got["t__hour"].isna().sum() == 50  # the missing ones
