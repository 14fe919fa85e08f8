"""Validation per Dask partition gives exactly what one in-memory validation gives (issue 4, item 5)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from distributed import LocalCluster

from tasks.ingest import ingest
from tasks.settings import UserError
from tasks.validate import validate
from tasks.validation.drift import column_stats
from tests.conftest import ROOT, real_slice, workspace

KEY = "california_housing/MedHouseVal"  # the dataset's entry of the reference file
pytestmark = pytest.mark.slow  # real clusters, servers, flows or several ranks: `make test-fast` skips them


@pytest.fixture(scope="module")
def scheduler():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as c:
        yield c.scheduler_address


def messy(text: bool = False) -> pd.DataFrame:
    """The real slice with a key column, a category column and failures spread over every partition
    (with text=True also words in a numeric column)."""
    frame = real_slice()
    if text:
        frame["AveBedrms"] = frame["AveBedrms"].astype(str).astype(object)  # as a text column of a CSV
        frame.loc[[5, 1800], "AveBedrms"] = ["n/a", "none"]
    frame.insert(0, "block", np.arange(len(frame)) * 7)
    frame.insert(1, "region", np.where(frame["Latitude"] > 36, "north", "south").astype(object))
    frame.loc[1500, "block"] = frame.loc[3, "block"]  # a duplicate key in another partition
    frame.loc[[10, 11], "block"] = 5  # ... and one inside a partition
    frame.loc[[40, 900, 2000], "region"] = "atlantis"
    frame.loc[[7, 650, 1300, 1999], "MedInc"] = [-1.0, 25.0, np.inf, -3.0]
    frame.loc[[20, 800, 1700], "HouseAge"] = np.nan  # allowed: at most 1% missing
    frame.loc[[30, 1600], "AveRooms"] = np.nan  # not allowed
    return frame


def suite_file(tmp_path: Path) -> str:
    suite = yaml.safe_load((ROOT / "data/suites/california_housing.yaml").read_text())
    suite["columns"] = {
        "block": {"type": "int", "unique": True},
        "region": {"type": "str", "values": ["north", "south"]},
        **suite["columns"],
    }
    suite["columns"]["HouseAge"]["nulls"] = 0.01
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    return str(tmp_path / "suite.yaml")


def reference_of(frame: pd.DataFrame) -> dict:
    shifted = frame.assign(MedInc=frame["MedInc"] * 1.5, region="north")
    return {"data_sha256": "x", "rows": len(frame), "columns": column_stats(shifted)}


def run(tmp_path: Path, name: str, source: Path, scheduler: str, **overrides):
    root = tmp_path / name
    s = workspace(
        root,
        None,
        dataset__source=str(source),
        dataset__suite=suite_file(tmp_path),
        dask__address=scheduler,
        validate__drift="warn",
        **overrides,
    )
    ingest(s)
    Path(s.validate_.reference).parent.mkdir(parents=True, exist_ok=True)
    Path(s.validate_.reference).write_text(json.dumps(reference_of(messy())))
    try:
        out = validate(s)
    except UserError as e:
        out = e
    return s, out


def comparable(s) -> dict:
    report = json.loads(Path(s.validate_.report).read_text())
    for key in ("checked", "validated"):
        report.pop(key, None)
    report["data"] = report["data"]["rows"]
    report["drift"].pop("reference")
    return report


def sources(d: Path, frame: pd.DataFrame) -> Path:
    """The same rows as one file, as one file of small row groups, and as a directory of three files."""
    (d / "dir").mkdir(parents=True)
    frame.to_parquet(d / "one.parquet", index=False)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), d / "groups.parquet", row_group_size=300)
    for i, (a, b) in enumerate([(0, 700), (700, 1400), (1400, len(frame))]):
        frame.iloc[a:b].to_parquet(d / "dir" / f"part-{i:05d}.parquet", index=False)
    return d


@pytest.mark.parametrize("case", ["quarantine", "fail", "text"])
def test_partitioned_validation_equals_in_memory(tmp_path, scheduler, case):
    on_failure = "quarantine" if case == "quarantine" else "fail"
    kw = {"validate__on_failure": on_failure, "validate__min_clean_fraction": 0.99}
    src = sources(tmp_path / "sources", messy(text=case == "text"))
    base, base_out = run(tmp_path, "memory", src / "one.parquet", scheduler, **kw)
    groups, groups_out = run(
        tmp_path, "groups", src / "groups.parquet", scheduler, validate__in_memory_max_rows=0, validate__partition_rows=700, **kw
    )
    folder, folder_out = run(tmp_path, "dir", src / "dir", scheduler, **kw)

    for s, mode, partitions in ((base, "in-memory", 1), (groups, "partitioned", 4), (folder, "partitioned", 3)):
        assert json.loads(Path(s.validate_.report).read_text())["checked"] == {"mode": mode, "partitions": partitions}
    expected = comparable(base)
    assert comparable(groups) == expected and comparable(folder) == expected
    unique = next(r for r in expected["results"] if r["expectation"] == "expect_column_values_to_be_unique")
    assert unique["unexpected_count"] == 4 and unique["sample_rows"] == [3, 10, 11, 1500]  # across partitions too

    if on_failure == "fail":
        assert isinstance(base_out, UserError)
        if case == "text":
            assert (
                "column AveBedrms should be float but holds 2 values that are not numbers, e.g. row 5: 'n/a', "
                "row 1800: 'none'" in str(base_out)
            )
        for name, out in (("groups", groups_out), ("dir", folder_out)):
            assert str(out).replace(str(tmp_path / name), str(tmp_path / "memory")) == str(base_out)
        assert (
            "expect_column_values_to_be_between column MedInc: 4 rows (0.19%) unexpected, e.g. row 7: -1.0, "
            "row 650: 25.0, row 1300: 'inf', row 1999: -3.0" in str(base_out)
        )
        return
    assert base_out["rows"] == {"input": 2064, "clean": 2051, "quarantined": 13}
    assert set(base_out["drift"]) == {"MedInc", "region"}
    for s in (groups, folder):
        pd.testing.assert_frame_equal(pd.read_parquet(s.validate_.out), pd.read_parquet(base.validate_.out))
        pd.testing.assert_frame_equal(pd.read_parquet(s.validate_.quarantine), pd.read_parquet(base.validate_.quarantine))
        ref, base_ref = (json.loads(Path(x.validate_.reference).read_text())["datasets"][KEY] for x in (s, base))
        assert ref["columns"] == base_ref["columns"] and ref["rows"] == base_ref["rows"] == 2051


def test_a_clean_partitioned_input_is_copied_as_it_is(tmp_path):
    from tasks.files import sha256_path

    src = tmp_path / "src"
    src.mkdir()
    frame = real_slice()
    for i in range(2):
        frame.iloc[i::2].to_parquet(src / f"part-{i}.parquet", index=False)
    s = workspace(tmp_path / "ws", dataset__source=str(src))  # the default local cluster: threads
    assert ingest(s)["rows"] == len(frame)
    out = validate(s)
    assert out["success"] and out["checked"] == {"mode": "partitioned", "partitions": 2}
    assert sorted(p.name for p in Path(s.validate_.out).iterdir()) == [".trainflow-output", "part-0.parquet", "part-1.parquet"]
    assert sha256_path(s.validate_.out) == sha256_path(s.ingest.out)
    assert len(pd.read_parquet(s.validate_.quarantine)) == 0


@pytest.mark.parametrize(
    "bad,expected",
    [
        ("schema", "part-1.parquet differs from part-0.parquet: missing ['AveOccup']; every file of a dataset must have"),
        ("corrupt", "part-1.parquet is a corrupt or truncated Parquet file"),
    ],
)
def test_a_bad_file_in_a_partitioned_dataset_is_named_and_nothing_is_overwritten(tmp_path, bad, expected):
    good = workspace(tmp_path / "ws")
    ingest(good)
    before = Path(good.ingest.out).read_bytes()
    src = tmp_path / "src"
    src.mkdir()
    real_slice().to_parquet(src / "part-0.parquet", index=False)
    if bad == "schema":
        real_slice().drop(columns="AveOccup").to_parquet(src / "part-1.parquet", index=False)
    else:
        (src / "part-1.parquet").write_bytes((src / "part-0.parquet").read_bytes()[:-100])
    s = workspace(tmp_path / "ws", dataset__source=str(src))
    with pytest.raises(UserError) as e:
        ingest(s)
    assert expected in str(e.value)
    assert Path(good.ingest.out).read_bytes() == before
    assert sorted(p.name for p in Path(good.ingest.out).parent.iterdir()) == ["data.parquet"]  # no staging left


def test_a_worker_killed_during_partitioned_validation_changes_nothing(tmp_path, scheduler):
    """SIGKILL a worker process of the cluster while it checks partitions: the lost ones are checked again on
    the survivor (the nanny restarts the dead worker) and every output equals an undisturbed run's."""
    from tests.test_dask_cluster import killing_a_busy_worker

    kw = {
        "validate__on_failure": "quarantine",
        "validate__min_clean_fraction": 0.99,
        "validate__in_memory_max_rows": 0,
        "validate__partition_rows": 300,
    }
    src = sources(tmp_path / "sources", messy())
    calm, _ = run(tmp_path, "calm", src / "groups.parquet", scheduler, **kw)
    with killing_a_busy_worker(scheduler) as killed:
        hit, _ = run(tmp_path, "hit", src / "groups.parquet", scheduler, **kw)
    assert killed, "no worker was busy to kill"
    assert comparable(hit) == comparable(calm)
    pd.testing.assert_frame_equal(pd.read_parquet(hit.validate_.out), pd.read_parquet(calm.validate_.out))
    pd.testing.assert_frame_equal(pd.read_parquet(hit.validate_.quarantine), pd.read_parquet(calm.validate_.quarantine))
