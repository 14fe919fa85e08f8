import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tasks.ingest import ingest
from tasks.settings import UserError
from tasks.validate import validate
from tests.conftest import ROOT, real_slice, workspace


def test_real_slice_passes(ws):
    ingest(ws)
    out = validate(ws)
    assert out["success"] and out["rows"] == {"input": 2064, "clean": 2064, "quarantined": 0}
    report = json.loads(Path(ws.validate_.report).read_text())
    assert report["pass_rate"] == 1.0
    assert report["evaluated"] == 2 + 3 * 9  # table-level + (type, nulls, range) per column
    md = Path(ws.validate_.report_md).read_text()
    assert md.startswith("# Validation PASSED: 29 of 29 expectations (100.0%)")
    # plain text marks, and each expectation's bound and observed value
    assert "| PASS | expect_column_values_to_be_between | Latitude | between 32.0 and 42.5 | 0 rows unexpected (0.00%) |" in md
    assert "| PASS | expect_table_row_count_to_be_between | (table) | between 1000 and 100000000 | `2064` |" in md
    assert (
        "| PASS | expect_column_values_to_be_in_type_list | MedInc | type in ['float64', 'float32', 'Float64', 'Float32'] |" in md
    )
    assert md.isascii() or not any(ch in md for ch in "✅❌")
    assert "Not checked: no reference yet (" in md and "the first accepted" in md  # why drift was not checked


def test_bad_values_are_listed_with_column_count_and_rows(tmp_path):
    frame = real_slice()
    frame.loc[[3, 7], "MedInc"] = -1.0
    frame.loc[5, "HouseAge"] = np.nan
    frame.loc[9, "Latitude"] = np.inf
    s = workspace(tmp_path, frame)
    ingest(s)
    with pytest.raises(UserError) as e:
        validate(s)
    msg = str(e.value)
    assert "failed 3 of 29 expectations" in msg
    assert "expect_column_values_to_be_between column MedInc: 2 rows (0.10%) unexpected, e.g. row 3: -1.0, row 7: -1.0" in msg
    assert "expect_column_values_to_not_be_null column HouseAge: 1 rows" in msg and "row 5" in msg
    assert "column Latitude: 1 rows" in msg and "'inf'" in msg
    assert s.validate_.report in msg
    report = json.loads(Path(s.validate_.report).read_text())
    assert report["success"] is False and report["passed"] == 26


def test_missing_column_is_named(tmp_path):
    s = workspace(tmp_path, real_slice().drop(columns=["AveOccup"]))
    ingest(s)
    with pytest.raises(UserError) as e:
        validate(s)
    assert "expect_table_columns_to_match_ordered_list columns differ from the suite: missing ['AveOccup']" in str(e.value)
    assert "(3 more failed as a consequence; see the report)" in str(e.value)  # not one line per broken check


def test_allowed_categories_are_enforced(tmp_path):
    frame = real_slice()
    frame.insert(0, "region", np.where(frame["Latitude"] > 36, "north", "south"))
    frame.loc[[4, 8], "region"] = "atlantis"
    suite = yaml.safe_load(Path(ROOT / "data/suites/california_housing.yaml").read_text())
    suite["columns"] = {"region": {"type": "str", "values": ["north", "south"]}, **suite["columns"]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    s = workspace(tmp_path, frame, dataset__suite=str(tmp_path / "suite.yaml"))
    ingest(s)
    with pytest.raises(UserError) as e:
        validate(s)
    assert (
        "expect_column_values_to_be_in_set column region: 2 rows (0.10%) unexpected, e.g. row 4: 'atlantis', row 8: 'atlantis'"
        in str(e.value)
    )


def test_quarantine_moves_failing_rows_aside_and_counts_add_up(tmp_path):
    from tasks.preprocess import preprocess

    frame = real_slice()
    frame.loc[[1, 2, 3], "AveRooms"] = -1.0
    frame.loc[[3, 5], "MedInc"] = np.nan
    s = workspace(tmp_path, frame, validate__on_failure="quarantine", validate__min_clean_fraction=0.99)
    ingest(s)
    out = validate(s)
    assert out["rows"] == {"input": 2064, "clean": 2060, "quarantined": 4}
    clean, quarantined = pd.read_parquet(s.validate_.out), pd.read_parquet(s.validate_.quarantine)
    assert len(clean) + len(quarantined) == len(frame)
    assert sorted(quarantined["_row"]) == [1, 2, 3, 5]
    reasons = dict(zip(quarantined["_row"], quarantined["_reason"]))
    assert reasons[1] == "AveRooms: expect_column_values_to_be_between"
    assert set(reasons[3].split("; ")) == {
        "AveRooms: expect_column_values_to_be_between",
        "MedInc: expect_column_values_to_not_be_null",
    }
    assert (clean["AveRooms"] >= 0).all() and clean["MedInc"].notna().all()
    assert sum(preprocess(s)["rows"].values()) == 2060  # the run goes on with the clean rows only


def test_quarantine_below_the_clean_fraction_stops_and_keeps_the_last_output(tmp_path):
    s = workspace(tmp_path, validate__on_failure="quarantine", validate__min_clean_fraction=0.99)
    ingest(s)
    validate(s)
    before = Path(s.validate_.out).read_bytes()
    frame = real_slice()
    frame.loc[:99, "AveRooms"] = -1.0  # 100 of 2,064 rows: 95.2% clean
    frame.to_parquet(s.dataset.source, index=False)
    ingest(s)
    with pytest.raises(
        UserError, match=r"only 1,964 of 2,064 rows .* pass \(95\.2%\), fewer than validate.min_clean_fraction=0.99"
    ):
        validate(s)
    assert Path(s.validate_.out).read_bytes() == before


def test_table_level_failures_stop_even_in_quarantine_mode(tmp_path):
    s = workspace(tmp_path, real_slice().drop(columns="Population"), validate__on_failure="quarantine")
    ingest(s)
    with pytest.raises(UserError, match=r"missing \['Population'\]"):
        validate(s)
    assert not Path(s.validate_.out).exists()
