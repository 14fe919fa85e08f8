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


def typed_flights() -> tuple[pd.DataFrame, dict]:
    """Every 20th real flight stored as people store data: a time zone-aware Parquet timestamp (time_hour),
    a naive one, integer widths, nullable integers and floats, true/false with missing values, pandas 3 text;
    and a suite declaring those types."""
    f = pd.read_parquet(ROOT / "data/sources/flights.parquet").iloc[::20].reset_index(drop=True)
    frame = pd.DataFrame(
        {
            "time_hour": pd.to_datetime(f["time_hour"], utc=True),
            "local": pd.to_datetime(f["time_hour"], utc=True).dt.tz_convert("America/New_York").dt.tz_localize(None),
            "year": f["year"].astype("int16"),
            "month": f["month"].astype("uint8"),
            "flight": f["flight"].astype("Int32"),
            "dep_delay": f["dep_delay"].astype("Float64"),  # real missing values as <NA>
            "late": (f["dep_delay"] > 15).astype("boolean").where(f["dep_delay"].notna()),
            "carrier": f["carrier"].astype("string"),
            "arr_delay": f["arr_delay"],
        }
    )
    suite = {
        "row_count": {"min": 1000},
        "columns": {
            "time_hour": {"type": "datetime", "min": "2013-01-01T00:00:00Z", "max": "2014-01-02T00:00:00+00:00"},
            "local": {"type": "datetime", "min": "2013-01-01", "max": "2014-01-01"},
            "year": {"type": "int16", "min": 2013, "max": 2013},
            "month": {"type": "uint8", "min": 1, "max": 12},
            "flight": {"type": "int", "min": 1, "max": 9999},
            "dep_delay": {"type": "float64", "nulls": 0.05},
            "late": {"type": "bool", "nulls": 0.05},
            "carrier": {"type": "str"},
            "arr_delay": {"type": "float", "nulls": 0.05},
        },
    }
    return frame, suite


def typed_run(root: Path, frame: pd.DataFrame, suite: dict, **overrides):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    (root / "suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    s = workspace(root, frame, dataset__suite=str(root / "suite.yaml"), **overrides)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), s.dataset.source, row_group_size=4000)
    ingest(s)
    try:
        validate(s)
    except UserError as e:
        return s, str(e)
    return s, None


def test_timestamps_widths_and_nullable_types_validate_alike_in_memory_and_partitioned(tmp_path):
    frame, suite = typed_flights()
    runs = {
        mode: typed_run(tmp_path / mode, frame, suite, validate__in_memory_max_rows=rows, validate__partition_rows=4000)
        for mode, rows in (("memory", 10**9), ("partitioned", 0))
    }
    # the reports, with the partitioned run's paths written as the in-memory run's
    reports = {
        m: json.loads(Path(s.validate_.report).read_text().replace(str(tmp_path / m), str(tmp_path / "memory")))
        for m, (s, _) in runs.items()
    }
    assert reports["partitioned"]["checked"] == {"mode": "partitioned", "partitions": 5}
    for m, (_, error) in runs.items():
        assert error is None and reports[m]["success"] and reports[m]["pass_rate"] == 1.0, error
    for r in reports.values():
        r.pop("checked")
    assert reports["memory"] == reports["partitioned"]
    types = {r["column"]: r["observed"] for r in reports["memory"]["results"] if r["expectation"].endswith("type_list")}
    assert types == {
        "time_hour": "datetime64[us, UTC]",
        "local": "datetime64[us]",
        "year": "int16",
        "month": "uint8",
        "flight": "Int32",
        "dep_delay": "Float64",
        "late": "boolean",
        "carrier": "object (string)",  # pandas 3 text, as GX is given it
        "arr_delay": "float64",
    }
    refs = [json.loads(Path(s.validate_.reference).read_text())["datasets"] for s, _ in runs.values()]
    assert refs[0] == refs[1]
    stats = refs[0]["california_housing/MedHouseVal"]["columns"]
    assert stats["time_hour"] == {
        "count": len(frame),
        "null_rate": 0.0,
        "first": "2013-01-01T10:00:00+00:00",
        "last": "2014-01-01T04:00:00+00:00",  # 11 pm in New York
    }
    md = Path(runs["memory"][0].validate_.report_md).read_text()  # the bounds in words
    assert (
        "| PASS | expect_column_values_to_be_in_type_list | time_hour | a timestamp (datetime64 of any unit, naive or "
        "with a time zone) | `datetime64[us, UTC]` |" in md
    )
    assert (
        "| expect_column_values_to_be_between | time_hour | between 2013-01-01T00:00:00+00:00 and 2014-01-02T00:00:00+00:00 |"
        in md
    )
    assert "| expect_column_values_to_be_in_type_list | month | type in ['uint8', 'UInt8'] |" in md
    assert "| expect_column_values_to_be_in_type_list | flight | an integer of any width (int8…int64" in md
    assert "| expect_column_values_to_be_in_type_list | late | true/false (bool, nullable boolean" in md


def test_a_timestamp_out_of_range_and_a_wrong_width_are_named(tmp_path):
    frame, suite = typed_flights()
    frame.loc[[3, 500], "time_hour"] = pd.Timestamp("2015-06-01T12:00:00Z")
    suite["columns"]["year"]["type"] = "int8"
    suite["columns"]["late"]["type"] = "str"
    _, error = typed_run(tmp_path, frame, suite)
    assert "failed 3 of 25 expectations" in error
    assert (
        "expect_column_values_to_be_between column time_hour: 2 rows (0.01%) unexpected, e.g. "
        "row 3: '2015-06-01T12:00:00+00:00', row 500: '2015-06-01T12:00:00+00:00'" in error
    )
    assert "expect_column_values_to_be_in_type_list column year: observed int16" in error
    assert "expect_column_values_to_be_in_type_list column late: observed boolean" in error


def test_a_bad_timestamp_bound_in_the_suite_is_named(tmp_path):
    from tasks.validation.suite import load_suite

    (tmp_path / "suite.yaml").write_text("columns:\n  t: {type: datetime, min: '2013-13-45'}\n")
    with pytest.raises(UserError, match=r"column t: min '2013-13-45' is not an ISO 8601 timestamp"):
        load_suite(tmp_path / "suite.yaml")
    (tmp_path / "suite.yaml").write_text("columns:\n  t: {type: int64, max: ten}\n")
    with pytest.raises(UserError, match=r"column t: max 'ten' must be a number \(type int64\)"):
        load_suite(tmp_path / "suite.yaml")


@pytest.mark.parametrize(
    "values,dtype,accepted",
    [
        (["a", None], "str", ["str"]),  # pandas 3's default text
        (["a", None], "string[python]", ["str"]),
        (["a", None], "string[pyarrow]", ["str"]),
        (["a", None], "category", ["str"]),
        (["a", 1], object, []),
        ([True, None], object, ["bool"]),  # Parquet booleans with nulls, read without pandas metadata
        ([1, None], "Int8", ["int", "int8"]),
        ([1, None], "UInt64", ["int", "uint64"]),
        ([1, 2], "int64[pyarrow]", ["int", "int64"]),
        ([1.5, None], "Float32", ["float", "float32"]),
        ([1.5, 2.0], "float16", []),
        (["2013-01-01T10:00Z", None], "datetime64[ns, UTC]", ["datetime"]),
        (["2013-01-01T10:00", None], "datetime64[s]", ["datetime"]),
    ],
)
def test_each_type_accepts_what_pandas_makes_of_it(values, dtype, accepted):
    from tasks.validation.dtypes import TYPES, type_ok

    col = pd.Series(values, dtype=dtype) if "datetime" not in str(dtype) else pd.Series(pd.to_datetime(values)).astype(dtype)
    assert [t for t in TYPES if type_ok(col, t)] == accepted
