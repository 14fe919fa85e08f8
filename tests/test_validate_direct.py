"""The partitions' direct checks (tasks/validation/direct.py) give exactly GX's results, field for field."""

import numpy as np
import pandas as pd
import pytest
import yaml

from tasks.tables import as_validated
from tasks.validation.direct import direct_results
from tasks.validation.partitioned import merge
from tasks.validation.suite import run_suite
from tests.conftest import ROOT, real_slice


def suite(**extra) -> dict:
    s = yaml.safe_load((ROOT / "data/suites/california_housing.yaml").read_text())
    s["columns"] = {
        "block": {"type": "int", "unique": True, "min": 0},
        "region": {"type": "str", "values": ["north", "south"], "nulls": 0.0005},
        **s["columns"],
    }
    s["columns"]["HouseAge"]["nulls"] = 0.01
    s["columns"]["Population"] = {"type": "float", "max": 30000}  # one bound only
    s["columns"]["AveOccup"] = {"type": "float", "min": 0}
    for name, spec in extra.items():
        s["columns"][name] |= spec
    return s


def messy() -> pd.DataFrame:
    """Real rows with nulls, out-of-range values (inf too), bad set members and duplicate keys, spread over
    the partitions (the first partition holds none of the set's failures)."""
    frame = real_slice()
    frame.insert(0, "block", np.arange(len(frame)) * 7)
    frame.insert(1, "region", np.where(frame["Latitude"] > 36, "north", "south").astype(object))
    frame.loc[[1500, 10, 11], "block"] = [frame.loc[3, "block"], 5, 5]
    frame.loc[20, "block"] = -7
    frame.loc[[900, 2000, 1201], "region"] = ["atlantis", "North", None]
    frame.loc[1202, "region"] = np.nan
    frame.loc[[7, 650, 1300, 1999, 1301], "MedInc"] = [-1.0, 25.0, np.inf, -3.0, -np.inf]
    frame.loc[[20, 800, 1700], "HouseAge"] = np.nan  # allowed: at most 1% missing
    frame.loc[[30, 1600, 1601], "AveRooms"] = np.nan  # not allowed
    frame.loc[[1000 + i for i in range(12)], "Population"] = 99999.0  # ... nor values over the max
    frame.loc[[5, 6], "AveOccup"] = [-0.5, np.nan]
    return as_validated(frame)  # text as object, as read_piece gives it


def cuts(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


@pytest.mark.parametrize("size", [700, 301, 2064])
def test_direct_results_equal_gx_on_every_partition_and_merged(size):
    frame, s = messy(), suite()
    whole = run_suite(frame, s)  # in memory: GX, the engine of record
    parts = []
    for a, b in cuts(len(frame), size):
        piece = frame.iloc[a:b].reset_index(drop=True)  # as read_piece gives it: rows numbered from 0
        gx, direct = run_suite(piece, s), direct_results(piece, s)
        assert direct == gx
        parts.append({"results": direct})
    # the direct parts merge to the in-memory report (uniqueness across partitions is not a per-part matter)
    merged = merge(parts, [a for a, _ in cuts(len(frame), size)], len(frame))
    unique = "expect_column_values_to_be_unique"
    assert [r for r in merged if r["expectation"] != unique] == [r for r in whole if r["expectation"] != unique]
    failed = {(r["column"], r["expectation"]): r["unexpected_count"] for r in whole if not r["success"]}
    assert failed == {
        ("block", "expect_column_values_to_be_between"): 1,
        ("block", "expect_column_values_to_be_unique"): 4,
        ("region", "expect_column_values_to_not_be_null"): 2,
        ("region", "expect_column_values_to_be_in_set"): 2,
        ("MedInc", "expect_column_values_to_be_between"): 5,
        ("AveRooms", "expect_column_values_to_not_be_null"): 3,
        ("Population", "expect_column_values_to_be_between"): 13,  # one real row too
        ("AveOccup", "expect_column_values_to_not_be_null"): 1,
        ("AveOccup", "expect_column_values_to_be_between"): 1,
    }


@pytest.mark.parametrize(
    "change",
    [
        lambda f: f.drop(columns=["AveOccup"]),  # a missing column
        lambda f: f[[*f.columns[1:], f.columns[0]]],  # columns in another order
        lambda f: f.assign(MedInc=f["MedInc"].astype("float32")),  # GX compares value by value
        lambda f: f.assign(MedInc=f["MedInc"].astype("Float64")),  # a nullable dtype
        lambda f: f.assign(AveBedrms=f["AveBedrms"].astype(str).astype(object)),  # text with a min/max
        lambda f: f.assign(block=pd.Timestamp("2024-01-01") + pd.to_timedelta(f["block"], unit="s")),
    ],
)
def test_what_direct_does_not_reproduce_goes_to_gx(change):
    assert direct_results(change(messy()), suite()) is None


def test_the_report_strings_match_gx_for_unusual_bounds():
    s = suite(MedInc={"min": 1, "max": 2}, Latitude={"min": 36})  # int bounds: GX reports them as floats
    frame = messy().iloc[:500].reset_index(drop=True)
    assert direct_results(frame, s) == run_suite(frame, s)


@pytest.mark.parametrize("extra", [{"MedInc": {"nulls": 1.5}}, {"MedInc": {"min": 3, "max": 1}}, {"MedInc": {"min": None}}])
def test_a_suite_gx_would_refuse_goes_to_gx(extra):
    s = suite()
    for name, spec in extra.items():
        s["columns"][name] = {k: v for k, v in s["columns"][name].items() if k not in ("min", "max")} | spec
    assert direct_results(messy(), s) is None
    assert direct_results(messy(), suite() | {"row_count": {"min": 1000.0}}) is None
