"""`trainflow dataset new`: a dataset section and a suite drafted from a real file, that read back exactly and
pass `trainflow use` and the validate stage on the same file."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import tasks.draft
from tasks.datasets import DATASETS
from tasks.draft import draft, scalar, summary
from tasks.errors import UserError
from tasks.files import sha256_file
from tasks.settings import edit_params, load_settings
from tests.conftest import ROOT, sh

TRAINFLOW = str(Path(sys.executable).with_name("trainflow"))
FLIGHTS = ROOT / "data/sources/flights.parquet"
CARRIERS = ["9E", "AA", "AS", "B6", "DL", "EV", "F9", "FL", "HA", "MQ", "OO", "UA", "US", "VX", "WN", "YV"]


def project(root: Path) -> Path:
    """A project directory: the shipped params.yaml (a 1-worker Dask cluster) and dvc.yaml, and data/sources/."""
    (root / "data/sources").mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(edit_params((ROOT / "params.yaml").read_text(), {"dask.n_workers": 1}))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    return root


def run(root: Path, *cmd: str) -> subprocess.CompletedProcess:
    return sh(root, *cmd, check=False, timeout=300)


def flights_table(step: int = 20) -> pd.DataFrame:
    """Every step-th real flight, with columns a person brings: Yes/No text, zero-padded hours as text, a real
    timestamp, true/false, small integer codes, a row number and a text identifier."""
    f = pd.read_parquet(FLIGHTS).iloc[::step].reset_index(drop=True)
    late = f["dep_delay"] > 15
    return pd.DataFrame(
        {
            "row": np.arange(len(f)) * 3 + 100,  # increases with every row
            "ticket": f["carrier"] + f["flight"].astype(str) + "-" + f.index.astype(str),  # unique text
            "origin": f["origin"],
            "hour_text": f["hour"].map(lambda h: f"{h:02d}"),  # "05", "10": numbers to YAML unless quoted
            "departed": pd.to_datetime(f["time_hour"], utc=True),
            "night": f["hour"] >= 20,
            "delay_band": (f["dep_delay"].fillna(0).clip(0, 299) // 60).astype("int64"),  # 5 codes
            "distance": f["distance"],
            "air_time": f["air_time"],
            "year": f["year"],
            "delayed": pd.Series(np.where(late, "Yes", "No"), dtype=object).where(f["dep_delay"].notna()),
        }
    )


def drafted(root: Path, name: str) -> tuple[dict, dict]:
    return (
        yaml.safe_load((root / f"data/datasets/{name}.yaml").read_text())["dataset"],
        yaml.safe_load((root / f"data/suites/{name}.yaml").read_text()),
    )


def validate_in(root: Path) -> dict:
    """ingest and validate, as `trainflow stage` runs them, in the project; the report."""
    for stage in ("ingest", "validate"):
        proc = run(root, TRAINFLOW, "stage", stage)
        assert proc.returncode == 0, proc.stderr
    return json.loads((root / "reports/validate/report.json").read_text())


def test_flights_drafted_then_used_then_validated(tmp_path):
    """The real flights file (336,776 rows x 19) through the commands a person types."""
    root = project(tmp_path)
    shutil.copy(FLIGHTS, root / "data/sources/flights.parquet")
    proc = run(root, TRAINFLOW, "dataset", "new", "data/sources/flights.parquet", "--target", "arr_delay", "--name", "fl")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Drafted fl from data/sources/flights.parquet: 336,776 rows, 19 columns (decided on all rows)." in out
    assert "task: regression on arr_delay (numbers, 577 distinct values)" in out
    assert "key: ['time_hour', 'flight', 'carrier'] (unique in the 336,776 rows read)" in out
    assert "slices: carrier, origin" in out
    assert out.rstrip().endswith("Next: trainflow use fl")  # found in the project's data/datasets/
    assert "warning: column year is set to ignore: a single value (2013)" in proc.stderr
    dataset, suite = drafted(root, "fl")
    assert dataset["sha256"] == sha256_file(FLIGHTS) and dataset["source"] == "data/sources/flights.parquet"
    assert dataset["columns"]["time_hour"] == "datetime" and dataset["columns"]["tailnum"] == "categorical"
    assert dataset["columns"]["year"] == "ignore" and "arr_delay" not in dataset["columns"]
    assert list(suite["columns"]) == list(pq.read_schema(FLIGHTS).names)  # every column, in order
    assert suite["columns"]["carrier"] == {"type": "str", "values": CARRIERS}
    assert suite["columns"]["dep_delay"]["nulls"] >= 8255 / 336776  # NaN count of dep_delay
    assert suite["columns"]["dep_delay"]["min"] <= -43 and suite["columns"]["dep_delay"]["max"] >= 1301
    assert suite["row_count"] == {"min": 168388, "max": 33677600}

    used = run(root, TRAINFLOW, "use", "data/datasets/fl.yaml")
    assert used.returncode == 0 and "params.yaml now trains on fl" in used.stdout, used.stderr
    report = validate_in(root)
    assert report["success"] and report["evaluated"] == report["passed"] == 2 + 19 * 2 + 16  # + bounds and values
    assert report["data"]["rows"] == 336776


def test_yes_no_and_numeric_looking_text_read_back_exactly(tmp_path, monkeypatch):
    """Real flights with Yes/No labels and zero-padded numbers as text: the YAML reads back to the values
    drafted (with PyYAML and with ruamel, DVC's YAML 1.2 reader), and the suite passes on the file."""
    from ruamel.yaml import YAML

    root = project(tmp_path)
    frame = flights_table()
    frame.to_parquet(root / "data/sources/late.parquet", index=False)
    monkeypatch.chdir(root)
    d = draft(Path("data/sources/late.parquet"), "delayed", "late")
    tasks.draft.write(d, force=False)
    dataset, suite = drafted(root, "late")
    assert dataset == d.dataset and suite == d.suite
    ruamel = YAML(typ="safe", pure=True)
    assert ruamel.load((root / "data/suites/late.yaml").read_text()) == d.suite
    assert ruamel.load((root / "data/datasets/late.yaml").read_text())["dataset"] == d.dataset
    assert dataset["task"] == "binary" and suite["columns"]["delayed"]["values"] == ["No", "Yes"]
    assert suite["columns"]["hour_text"]["values"][:3] == ["05", "06", "07"]
    text = (root / "data/suites/late.yaml").read_text()
    assert '["No", "Yes"]' in text and '"05"' in text
    # each kind, with its reason
    kinds = {c.name: (c.kind, c.why) for c in d.columns}
    assert kinds["row"] == ("ignore", "integers that increase with every row (a row number)")
    assert kinds["ticket"][0] == "ignore" and kinds["ticket"][1].startswith("identifier-like: 16,839 distinct values")
    assert kinds["departed"] == ("datetime", "timestamps") and kinds["night"] == ("categorical", "true/false")
    assert kinds["delay_band"] == ("categorical", "integer codes, 5 distinct values")
    assert kinds["hour_text"][0] == "categorical" and kinds["year"][0] == "ignore"
    assert dataset["key"] == ["row"] and suite["columns"]["row"]["unique"] is True  # the identifier first
    assert dataset["slices"] == ["origin", "hour_text"]
    assert suite["columns"]["departed"] == {
        "type": "datetime",
        "min": "2012-11-25T00:00:00+00:00",
        "max": "2014-02-07T00:00:00+00:00",
    }
    assert run(root, TRAINFLOW, "use", "data/datasets/late.yaml").returncode == 0
    report = validate_in(root)
    assert report["success"] and report["pass_rate"] == 1.0


def test_a_parquet_file_bigger_than_the_sample_is_read_in_one_pass(tmp_path, monkeypatch):
    """Above SAMPLE_ROWS: decisions on a spread sample of batches, rows from the metadata, bounds, nulls and
    values from every row (so the suite holds on the whole file)."""
    monkeypatch.setattr(tasks.draft, "SAMPLE_ROWS", 40_000)
    monkeypatch.setattr(tasks.draft, "BATCH_ROWS", 10_000)
    root = project(tmp_path)
    pq.write_table(pq.read_table(FLIGHTS), root / "data/sources/flights.parquet", row_group_size=50_000)
    monkeypatch.chdir(root)
    d = draft(Path("data/sources/flights.parquet"), "arr_delay", "big")
    assert d.rows == 336776 and d.sampled == 40_000  # every 9th batch of 10,000 rows
    flights = pd.read_parquet(FLIGHTS)
    assert d.suite["columns"]["carrier"]["values"] == CARRIERS
    for name in ("dep_delay", "arr_delay", "air_time", "distance"):
        spec = d.suite["columns"][name]
        assert spec["min"] <= flights[name].min() and spec["max"] >= flights[name].max()
        assert spec.get("nulls", 0) >= flights[name].isna().mean()
    tasks.draft.write(d, force=False)
    assert run(root, TRAINFLOW, "use", "data/datasets/big.yaml").returncode == 0
    assert validate_in(root)["success"]


def test_a_csv_is_drafted_as_ingest_reads_it(tmp_path):
    root = project(tmp_path)
    frame = pd.read_parquet(ROOT / "data/sources/california_housing.parquet").iloc[::10]
    frame.to_csv(root / "data/sources/homes.csv", index=False)
    proc = run(root, sys.executable, "-m", "tasks.draft", "data/sources/homes.csv", "--target", "MedHouseVal")
    assert proc.returncode == 0, proc.stderr
    dataset, suite = drafted(root, "homes")
    assert set(dataset["columns"].values()) == {"numeric"} and dataset["task"] == "regression"
    assert dataset["key"] == [] and "no set of up to 3 columns" in proc.stdout  # floats only: no key
    assert suite["columns"]["Latitude"]["min"] <= frame["Latitude"].min()
    assert run(root, TRAINFLOW, "use", "data/datasets/homes.yaml").returncode == 0
    assert validate_in(root)["success"]


def test_existing_files_are_kept_without_force(tmp_path):
    root = project(tmp_path)
    flights_table(100).to_parquet(root / "data/sources/late.parquet", index=False)
    cmd = [TRAINFLOW, "dataset", "new", "data/sources/late.parquet", "--target", "delayed"]
    assert run(root, *cmd).returncode == 0
    (root / "data/suites/late.yaml").write_text("# reviewed\n")
    before = (root / "data/datasets/late.yaml").read_bytes()
    again = run(root, *cmd)
    assert again.returncode == 2 and again.stdout == ""
    assert (
        again.stderr
        == "error: data/datasets/late.yaml exists; pass --force to replace it (or --name to draft under another name)\n"
    )
    assert (root / "data/suites/late.yaml").read_text() == "# reviewed\n"
    assert (root / "data/datasets/late.yaml").read_bytes() == before
    assert run(root, *cmd, "--force").returncode == 0
    assert (root / "data/suites/late.yaml").read_text().startswith("# Expectations drafted")
    assert sorted(p.name for p in (root / "data/suites").iterdir()) == ["late.yaml"]  # no temporary file left


@pytest.mark.parametrize(
    "target,task,expected",
    [
        ("origin", "auto", ("multiclass", "text with 3 labels ['EWR', 'JFK', 'LGA']")),
        (
            "delay_band",
            "auto",
            ("multiclass", "integers with 5 labels [0, 1, 2, 3, 4]; pass --task regression if they are amounts"),
        ),
        ("night", "auto", ("binary", "2 labels [False, True]")),
        ("air_time", "auto", ("regression", "numbers, 400 distinct values")),
        ("delay_band", "regression", ("regression", "as asked (int, 5 labels [0, 1, 2, 3, 4])")),
    ],
)
def test_the_task_follows_the_target(tmp_path, monkeypatch, target, task, expected):
    flights_table().to_parquet(tmp_path / "t.parquet", index=False)
    monkeypatch.chdir(tmp_path)
    d = draft(Path("t.parquet"), target, "t", task)
    assert (d.dataset["task"], d.why["task"]) == expected


@pytest.mark.parametrize(
    "target,task,message",
    [
        ("origin", "binary", "--task binary does not fit target origin (str, 3 labels ['EWR', 'JFK', 'LGA'])"),
        ("origin", "regression", "--task regression does not fit target origin"),
        ("departed", "auto", "target departed is datetime"),
        ("year", "auto", "target year is int with 1 labels [2013]; choose a column with something to predict"),
        ("nope", "auto", "--target nope: no such column; the columns are ['row', 'ticket'"),
    ],
)
def test_a_target_that_does_not_fit_is_refused_by_name(tmp_path, monkeypatch, target, task, message):
    flights_table(100).to_parquet(tmp_path / "t.parquet", index=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        draft(Path("t.parquet"), target, "t", task)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "text",
    [
        "No",
        "Yes",
        "on",
        "OFF",
        "null",
        "~",
        "1e3",
        "007",
        "2013-01-01",
        "true",
        "y",
        ">50K",
        "a: b",
        "#x",
        "",
        " pad",
        "é",
        "[1]",
    ],
)
def test_text_that_yaml_would_misread_is_quoted(text):
    from ruamel.yaml import YAML

    for value in (text, [text], {text: text}):
        dumped = tasks.draft.flow(value)
        assert yaml.safe_load(io.StringIO(f"k: {dumped}"))["k"] == value
        assert YAML(typ="safe", pure=True).load(f"k: {dumped}")["k"] == value
    for number in (1e-05, 1e20, -2.5, 0.1, 7, -3):
        assert yaml.safe_load(scalar(number)) == number


def test_the_next_command_names_the_dataset_in_the_project_root(tmp_path, monkeypatch):
    flights_table(100).to_parquet(tmp_path / "t.parquet", index=False)
    monkeypatch.chdir(tmp_path)
    d = draft(Path("t.parquet"), "delayed", "t")
    assert summary(d, (DATASETS / "t.yaml", Path("data/suites/t.yaml"))).endswith("Next: trainflow use t")


@pytest.mark.parametrize(
    "cmd", [[TRAINFLOW, "dataset", "new"], [sys.executable, "-m", "tasks.draft"]], ids=["trainflow", "python -m"]
)
def test_help_prints_help_and_writes_nothing(tmp_path, cmd):
    proc = run(tmp_path, *cmd, "--help")
    assert proc.returncode == 0 and proc.stdout.lower().startswith("usage:") and "--target" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_the_drafted_settings_load(tmp_path, monkeypatch):
    """What `use` pastes into params.yaml is what load_settings accepts (the dataset section, every key)."""
    root = project(tmp_path)
    flights_table(100).to_parquet(root / "data/sources/late.parquet", index=False)
    assert run(root, TRAINFLOW, "dataset", "new", "data/sources/late.parquet", "--target", "delayed").returncode == 0
    assert run(root, TRAINFLOW, "use", "data/datasets/late.yaml").returncode == 0
    monkeypatch.chdir(root)
    s = load_settings()
    assert s.dataset.name == "late" and s.dataset.task == "binary" and s.evaluate.primary == "roc_auc"
    assert list(s.dataset.model_dump()) == [
        "name",
        "modality",
        "source",
        "sha256",
        "suite",
        "task",
        "target",
        "target_transform",
        "key",
        "columns",
        "slices",
        "image",
    ]
    assert pa.types.is_timestamp(pq.read_schema(root / "data/sources/late.parquet").field("departed").type)
