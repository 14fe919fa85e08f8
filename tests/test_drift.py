"""Drift of new data against the statistics of the last accepted data."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.ingest import ingest
from tasks.settings import UserError
from tasks.validate import validate
from tasks.validation.drift import column_stat, fractions, psi
from tests.conftest import parse, real_slice, workspace

KEY = "california_housing/MedHouseVal"  # the default dataset's entry in the reference file


def entry(s, key: str = KEY) -> dict:
    """A dataset's entry of the reference file."""
    return json.loads(Path(s.validate_.reference).read_text())["datasets"][key]


def with_policy(s, policy):
    raw = s.model_dump(by_alias=True)
    raw["validate"]["drift"] = policy
    return parse(raw)


def feed(s, frame):
    frame.to_parquet(Path(s.dataset.source), index=False)
    ingest(s)


def test_accepted_data_becomes_the_reference(ws):
    ingest(ws)
    validate(ws)
    ref = entry(ws)
    frame = real_slice()
    assert ref["rows"] == len(frame)
    assert ref["columns"]["MedInc"]["mean"] == pytest.approx(frame["MedInc"].mean(), rel=1e-12)
    assert ref["columns"]["MedInc"]["quantiles"][5] == pytest.approx(frame["MedInc"].median(), rel=1e-12)
    # the same kind of data again (the other rows of the real dataset) does not drift
    feed(ws, real_slice(7))
    assert validate(ws)["drift"] == {}


def test_drift_beyond_the_bounds_stops_and_keeps_the_reference(tmp_path):
    s = workspace(tmp_path)
    ingest(s)
    validate(s)
    before = Path(s.validate_.reference).read_bytes()
    shifted = real_slice()
    shifted["MedInc"] += 1.5  # incomes up $15k everywhere: still inside the suite's ranges
    feed(s, shifted)
    with pytest.raises(UserError) as e:
        validate(s)
    msg = str(e.value)
    assert "drifted from the last accepted data" in msg and "column MedInc: mean moved" in msg and "PSI" in msg
    assert "validate.drift: warn" in msg and "HouseAge" not in msg
    assert Path(s.validate_.reference).read_bytes() == before
    report = json.loads(Path(s.validate_.report).read_text())
    assert report["drift"]["columns"]["MedInc"]["mean_shift_std"] > 0.5
    # accepting it once with `warn` makes it the new reference
    assert "MedInc" in validate(with_policy(s, "warn"))["drift"]
    assert entry(s)["columns"]["MedInc"]["mean"] == pytest.approx(shifted["MedInc"].mean())
    assert validate(s)["drift"] == {}


def test_new_and_vanished_categories_are_drift(tmp_path):
    import yaml

    from tests.conftest import ROOT

    frame = real_slice()
    frame.insert(0, "region", np.where(frame["Latitude"] > 36, "north", "south"))
    suite = yaml.safe_load((ROOT / "data/suites/california_housing.yaml").read_text())
    suite["columns"] = {"region": {"type": "str"}, **suite["columns"]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    s = workspace(tmp_path, frame, dataset__suite=str(tmp_path / "suite.yaml"))
    ingest(s)
    validate(s)
    frame["region"] = frame["region"].replace({"south": "central"})
    feed(s, frame)
    with pytest.raises(UserError, match=r"column region: new categories \['central'\], vanished \['south'\]"):
        validate(s)


def test_psi_is_zero_for_the_reference_and_large_for_a_shift():
    x = np.random.default_rng(0).normal(size=100_000)
    bins = column_stat(pd.Series(x))["bins"]
    assert psi(bins, x) < 1e-3
    assert psi(bins, x + 1.0) > 0.25


def rare_nonzero(x: pd.Series) -> pd.Series:
    """A real column's values above its 99.5th percentile, else 0: a column that is 99.5% zeros."""
    return x.where(x > x.quantile(0.995), 0.0)


def tied_columns() -> dict[str, np.ndarray]:
    """Real columns whose deciles tie: 99.5% zeros, a low-cardinality integer, and a real measurement."""
    from tests.conftest import ROOT

    housing = pd.read_parquet(ROOT / "data/sources/california_housing.parquet")
    flights = pd.read_parquet(ROOT / "data/sources/flights.parquet", columns=["hour"])
    return {
        "zeros": rare_nonzero(housing["AveRooms"]).to_numpy(),
        "hour": flights["hour"].to_numpy(),  # 20 distinct departure hours: deciles tie
        "HouseAge": housing["HouseAge"].to_numpy(),  # 52 distinct years, 6% at the cap 52
    }


@pytest.mark.parametrize("name", ["zeros", "hour", "HouseAge"])
def test_psi_of_tied_and_low_cardinality_columns_against_themselves_is_zero(name):
    x = tied_columns()[name]
    bins = column_stat(pd.Series(x))["bins"]
    assert sum(bins["fractions"]) == pytest.approx(1.0)
    assert psi(bins, x) < 1e-9
    assert psi(bins, x[::2]) < 0.01  # half of the same data
    if name == "zeros":  # two bins: the zeros (99.5%) and the rest; not 10% per decile
        assert bins["edges"] == [0.0] and bins["fractions"] == pytest.approx([0.995, 0.005], abs=1e-3)
    # a value tied to an edge falls in the bin below it, as new data is binned
    assert bins["fractions"][0] == pytest.approx(np.mean(x <= bins["edges"][0]))


@pytest.mark.parametrize("name", ["zeros", "hour", "HouseAge"])
def test_reference_deciles_are_numpys_of_the_unsorted_column(name):
    """column_stat sorts before np.quantile (faster): the deciles stay exactly those of the column as it is."""
    x = tied_columns()[name].astype(np.float64)
    x[::97] = np.nan  # not finite: left out
    finite = x[np.isfinite(x)]
    assert column_stat(pd.Series(x))["quantiles"] == np.quantile(finite, np.linspace(0, 1, 11)).tolist()


def test_psi_still_sees_a_shift_of_a_tied_column():
    x = tied_columns()["hour"]
    bins = column_stat(pd.Series(x))["bins"]
    assert psi(bins, np.where(x < 12, x + 6, x)) > 0.25  # mornings moved to the afternoon


def test_a_column_of_ties_does_not_drift_from_itself_in_memory_and_partitioned(tmp_path):
    """The stage on real data with a 99.5%-zeros column (PSI 0.31 against itself before bins were stored):
    the same data again does not drift, and the partitioned path stores the same bins as in memory."""
    import yaml

    from tests.conftest import ROOT

    frame = real_slice(1)  # all 20,640 rows
    frame.insert(0, "zeros", rare_nonzero(frame["AveRooms"]))
    suite = yaml.safe_load((ROOT / "data/suites/california_housing.yaml").read_text())
    suite["columns"] = {"zeros": {"type": "float", "min": 0}, **suite["columns"]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    refs = []
    for name, rows in (("memory", 10**9), ("partitioned", 0)):
        s = workspace(tmp_path / name, frame, dataset__suite=str(tmp_path / "suite.yaml"), validate__in_memory_max_rows=rows)
        ingest(s)
        assert validate(s)["checked"]["mode"] == ("in-memory" if rows else "partitioned")
        assert validate(s)["drift"] == {}  # compared with itself: no drift (validate.drift is fail)
        report = json.loads(Path(s.validate_.report).read_text())
        assert report["drift"]["checked"] and report["drift"]["psi_not_computed"] == []
        refs.append(entry(s))
    assert refs[0]["columns"]["zeros"]["bins"]["edges"] == [0.0]
    assert refs[0]["columns"] == refs[1]["columns"]  # the same bins and fractions, exactly


def switching_project(root: Path) -> Path:
    """A project with two datasets: a (the real California slice) and b (every 100th real flight)."""
    import shutil

    import yaml

    from tasks.settings import edit_params
    from tests.conftest import ROOT

    (root / "data/sources").mkdir(parents=True)
    (root / "params.yaml").write_text(edit_params((ROOT / "params.yaml").read_text(), {"dask.n_workers": 1}))
    real_slice().to_parquet(root / "data/sources/a.parquet", index=False)
    pd.read_parquet(ROOT / "data/sources/flights.parquet").iloc[::100].to_parquet(root / "data/sources/b.parquet", index=False)
    (root / "data/datasets").mkdir()
    for name, shipped in (("a", "california_housing"), ("b", "flights")):
        section = yaml.safe_load((ROOT / f"data/datasets/{shipped}.yaml").read_text())
        section["dataset"].update(name=name, source=f"data/sources/{name}.parquet", sha256=None)
        section["dataset"]["suite"] = str(ROOT / section["dataset"]["suite"])
        (root / f"data/datasets/{name}.yaml").write_text(yaml.safe_dump(section, sort_keys=False))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    return root


def use_and_validate(root: Path, name: str) -> dict:
    """`trainflow use` (the real command), then ingest and validate on the project's params.yaml."""
    import sys

    from tasks.settings import load_settings
    from tests.conftest import sh

    sh(root, str(Path(sys.executable).with_name("trainflow")), "use", f"data/datasets/{name}.yaml")
    s = load_settings(root / "params.yaml")
    ingest(s)
    return validate(s)


def test_each_dataset_is_compared_with_its_own_reference(tmp_path, monkeypatch):
    root = switching_project(tmp_path)
    monkeypatch.chdir(root)
    reference = root / "data/reference/stats.json"
    use_and_validate(root, "a")
    assert use_and_validate(root, "b")["drift"] == {}  # not compared with a's columns
    report = json.loads((root / "reports/validate/report.json").read_text())
    assert report["drift"]["checked"] is False
    assert report["drift"]["reason"].startswith(
        "no reference yet for dataset b/arr_delay (data/reference/stats.json holds a/MedHouseVal;"
    )
    both = json.loads(reference.read_text())["datasets"]
    assert list(both) == ["a/MedHouseVal", "b/arr_delay"] and both["b/arr_delay"]["rows"] == 3368
    shifted = real_slice()
    shifted["MedInc"] += 1.5
    shifted.to_parquet(root / "data/sources/a.parquet", index=False)
    with pytest.raises(
        UserError, match=r"drifted from the last accepted data of a/MedHouseVal .*\n  - column MedInc: mean moved"
    ):
        use_and_validate(root, "a")  # compared with a's reference, not b's
    assert json.loads(reference.read_text())["datasets"] == both  # a refused run writes nothing
    real_slice().to_parquet(root / "data/sources/a.parquet", index=False)
    assert use_and_validate(root, "a")["drift"] == {}
    assert json.loads(reference.read_text())["datasets"]["b/arr_delay"] == both["b/arr_delay"]  # the other kept


def old_layout(frame: pd.DataFrame) -> dict:
    """A reference as the code before per-dataset entries and bins wrote it."""
    from tasks.validation.drift import column_stats

    columns = {n: {k: v for k, v in s.items() if k != "bins"} for n, s in column_stats(frame).items()}
    return {"data_sha256": "0" * 64, "rows": len(frame), "columns": columns}


def test_an_old_reference_of_the_same_columns_is_this_datasets(tmp_path):
    s = workspace(tmp_path)
    Path(s.validate_.reference).parent.mkdir(parents=True)
    Path(s.validate_.reference).write_text(json.dumps(old_layout(real_slice())))
    shifted = real_slice()
    shifted["MedInc"] += 1.5
    feed(s, shifted)
    with pytest.raises(
        UserError, match=r"column MedInc: mean moved 0.79 std \(max 0.5\), PSI not computed \(a reference without bins\)"
    ):
        validate(s)
    report = json.loads(Path(s.validate_.report).read_text())
    assert report["drift"]["psi_not_computed"] == list(real_slice().columns)
    assert "PSI not computed for MedInc, HouseAge" in Path(s.validate_.report_md).read_text()
    feed(s, real_slice())
    assert validate(s)["drift"] == {}
    assert list(json.loads(Path(s.validate_.reference).read_text())) == ["datasets"]  # rewritten in the new layout
    assert "bins" in entry(s)["columns"]["MedInc"]


def test_an_old_reference_of_other_columns_is_not_compared(tmp_path):
    from tests.conftest import ROOT

    s = workspace(tmp_path)
    Path(s.validate_.reference).parent.mkdir(parents=True)
    flights = pd.read_parquet(ROOT / "data/sources/flights.parquet").iloc[::100]
    Path(s.validate_.reference).write_text(json.dumps(old_layout(flights)))
    ingest(s)
    assert validate(s)["drift"] == {}
    reason = json.loads(Path(s.validate_.report).read_text())["drift"]["reason"]
    assert "has the old one-dataset layout with other columns" in reason and "another dataset's" in reason
    assert list(json.loads(Path(s.validate_.reference).read_text())["datasets"]) == [KEY]


def test_an_unreadable_reference_is_named(tmp_path):
    s = workspace(tmp_path)
    Path(s.validate_.reference).parent.mkdir(parents=True)
    Path(s.validate_.reference).write_text("{not json")
    ingest(s)
    with pytest.raises(UserError, match=r"validate.reference: .*stats.json is not readable JSON .*; delete it"):
        validate(s)


def test_bin_fractions_close_each_bin_on_the_right():
    """A value equal to an edge falls in the bin below it: the fractions are the binary search's, exactly."""
    x = np.array([0.0, 1.0, 1.0, 1.0, 2.0, 2.5, 3.0, 3.0, 9.0, -4.0])
    for edges in (np.array([1.0, 3.0]), np.array([1.0]), np.array([-10.0, 0.0, 2.0, 100.0])):
        expected = np.bincount(np.searchsorted(edges, x, side="left"), minlength=len(edges) + 1) / len(x)
        np.testing.assert_array_equal(fractions(edges, x), expected)
    assert fractions(np.array([1.0, 3.0]), x).tolist() == [0.5, 0.4, 0.1]
