from pathlib import Path

import pandas as pd
import pytest

from tasks.ingest import ingest
from tasks.settings import UserError
from tests.conftest import ROOT, parse, project_params, real_slice, small_params


def test_default_source_is_the_real_dataset(tmp_path):
    raw = project_params()
    raw["dataset"]["source"] = str(ROOT / raw["dataset"]["source"])
    raw["ingest"]["out"] = str(tmp_path / "raw.parquet")
    out = ingest(parse(raw))
    assert out["rows"] == 20_640
    assert out["sha256"] == raw["dataset"]["sha256"]
    frame = pd.read_parquet(tmp_path / "raw.parquet")
    assert frame.shape == (20_640, 9)
    assert frame["MedHouseVal"].mean() == pytest.approx(2.068558, abs=1e-6)


@pytest.mark.parametrize("url", [False, True])
def test_csv_source_reads_like_parquet(tmp_path, url):
    csv = tmp_path / "slice.csv"
    real_slice().to_csv(csv, index=False)
    s = parse(small_params(tmp_path, f"file://{csv}" if url else csv))
    assert ingest(s)["rows"] == 2064
    pd.testing.assert_frame_equal(pd.read_parquet(s.ingest.out), real_slice(), check_exact=False, rtol=1e-12)


def test_sha256_mismatch_stops_and_keeps_previous_output(ws):
    ingest(ws)
    before = Path(ws.ingest.out).read_bytes()
    raw = ws.model_dump(by_alias=True)
    raw["dataset"]["sha256"] = "0" * 64
    with pytest.raises(UserError, match="dataset.sha256: .* has sha256 [0-9a-f]{64}, expected 0000"):
        ingest(parse(raw))
    assert Path(ws.ingest.out).read_bytes() == before
