"""The scale-up generator keeps the real data's shape: columns, ranges, means, missing values."""

import numpy as np
import pandas as pd
import pytest

from bench.scale_up import scale_up
from tests.conftest import real_slice


def test_grows_a_real_slice_into_partitioned_parquet(tmp_path):
    src = tmp_path / "slice.parquet"
    frame = real_slice()
    frame.loc[::50, "AveRooms"] = np.nan  # missing values survive resampling
    frame.to_parquet(src, index=False)
    out = scale_up(str(src), 10_000, tmp_path / "big", rows_per_file=4_000)
    files = sorted((tmp_path / "big").glob("*.parquet"))
    assert out["files"] == 3 and [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    big = pd.concat(pd.read_parquet(f) for f in files)
    assert [len(pd.read_parquet(f)) for f in files] == [4_000, 4_000, 2_000]
    assert list(big.columns) == list(frame.columns) and (big.dtypes == frame.dtypes).all()
    for c in frame.columns:
        lo, hi = frame[c].min(), frame[c].max()
        assert big[c].min() >= lo and big[c].max() <= hi  # still inside the suite's ranges
        assert big[c].mean() == pytest.approx(frame[c].mean(), rel=0.05)
    assert big["AveRooms"].isna().mean() == pytest.approx(frame["AveRooms"].isna().mean(), abs=0.01)
    assert (big["HouseAge"] % 1 == 0).all()  # whole-number columns stay whole
    assert len(big.merge(frame, how="inner")) < 0.01 * len(big)  # jitter: not copies of the source rows
    again = scale_up(str(src), 10_000, tmp_path / "again", rows_per_file=4_000)
    assert again["rows"] == 10_000
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "again" / files[1].name), pd.read_parquet(files[1]))
