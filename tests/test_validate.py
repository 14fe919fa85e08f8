import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.ingest import ingest
from tasks.settings import UserError
from tasks.validate import validate
from tests.conftest import ROOT, real_slice, workspace


def test_real_slice_passes(ws):
    ingest(ws)
    out = validate(ws)
    assert out["success"] and out["rows"] == 2064
    report = json.loads(Path(ws.validate_.report).read_text())
    assert report["pass_rate"] == 1.0
    assert report["evaluated"] == 2 + 3 * 9  # table-level + (type, nulls, range) per column
    assert Path(ws.validate_.report_md).read_text().startswith("# Validation PASSED: 29 of 29 expectations (100.0%)")


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
    s = workspace(tmp_path, frame, validate__suite=str(tmp_path / "suite.yaml"))
    ingest(s)
    with pytest.raises(UserError) as e:
        validate(s)
    assert "expect_column_values_to_be_in_set column region: 2 rows (0.10%) unexpected, e.g. row 4: 'atlantis', row 8: 'atlantis'" in str(e.value)
