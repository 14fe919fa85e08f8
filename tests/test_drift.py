"""Drift of new data against the statistics of the last accepted data."""

import json
from pathlib import Path

import numpy as np
import pytest

from tasks.ingest import ingest
from tasks.settings import UserError
from tasks.validate import validate
from tasks.validation.drift import psi
from tests.conftest import parse, real_slice, workspace


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
    ref = json.loads(Path(ws.validate_.reference).read_text())
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
    assert json.loads(Path(s.validate_.reference).read_text())["columns"]["MedInc"]["mean"] == pytest.approx(
        shifted["MedInc"].mean()
    )
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
    q = np.quantile(x, np.linspace(0, 1, 11)).tolist()
    assert psi(q, x) < 1e-3
    assert psi(q, x + 1.0) > 0.25
