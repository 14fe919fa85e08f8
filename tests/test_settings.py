import subprocess
import sys

import pytest
import yaml

from tasks.datasets import train_for
from tasks.settings import PRIMARY, UserError, load_settings, parse_settings
from tests.conftest import ROOT, project_params


def test_project_params_load():
    s = load_settings(ROOT / "params.yaml")
    assert s.dataset.target == "MedHouseVal"
    assert (s.preprocess.split.train, s.preprocess.split.val, s.preprocess.split.test) == (0.64, 0.16, 0.20)


@pytest.mark.parametrize(
    "section,key,value,expected",
    [
        ("train", "lr", -1, "train.lr = -1"),
        ("train", "world_size", 0, "train.world_size = 0"),
        ("train", "dropout", 1.5, "train.dropout = 1.5"),
        ("preprocess", "scaler", "minmax", "preprocess.scaler = 'minmax'"),
        ("dask", "n_workers", "two", "dask.n_workers = 'two'"),
        ("train", "schedule", "linear", "train.schedule = 'linear': Input should be 'cosine', 'onecycle' or 'plateau'"),
        ("train", "numeric_embedding", "fourier", "train.numeric_embedding = 'fourier'"),
        ("train", "embedding_bins", 0, "train.embedding_bins = 0"),
        ("train", "embedding_dim", 0, "train.embedding_dim = 0"),
    ],
)
def test_bad_value_names_the_key(section, key, value, expected):
    raw = project_params()
    raw[section][key] = value
    with pytest.raises(UserError, match=None) as e:
        parse_settings(raw)
    assert expected in str(e.value)
    assert "params.yaml" in str(e.value)


def test_unknown_key_is_refused():
    raw = project_params()
    raw["train"]["learning_rate"] = 0.1
    with pytest.raises(UserError) as e:
        parse_settings(raw)
    assert "unknown key 'train.learning_rate'" in str(e.value)


def test_missing_key_is_named():
    raw = project_params()
    del raw["train"]["epochs"]
    with pytest.raises(UserError, match="missing key 'train.epochs'"):
        parse_settings(raw)


def test_split_must_sum_to_one():
    raw = project_params()
    raw["preprocess"]["split"] = {"train": 0.7, "val": 0.2, "test": 0.2}
    with pytest.raises(UserError, match=r"preprocess.split: .*must be 1"):
        parse_settings(raw)


def test_cli_reports_bad_params_without_traceback(tmp_path):
    raw = project_params()
    raw["train"]["lr"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.ingest"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert "train.lr = -1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()  # nothing was produced


@pytest.mark.parametrize(
    "change,expected",
    [
        (
            {"columns": {"MedInc": "text"}},
            "dataset.columns.MedInc = 'text': Input should be 'numeric', 'categorical', 'datetime' or 'ignore'",
        ),
        ({"key": ["block"]}, "key columns ['block'] are not in columns"),
        ({"target": "MedInc"}, "the target 'MedInc' is also listed in columns"),
        ({"task": "ranking"}, "dataset.task = 'ranking'"),
    ],
)
def test_bad_dataset_sections_name_the_key(change, expected):
    raw = project_params()
    raw["dataset"].update(change)
    with pytest.raises(UserError) as e:
        parse_settings(raw)
    assert expected in str(e.value)


def test_use_switches_the_dataset_section_and_keeps_the_rest(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    before = params.read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.datasets", "use", str(ROOT / "data/datasets/flights.yaml")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    s = load_settings(params)
    assert (s.dataset.name, s.dataset.target, s.dataset.columns["carrier"]) == ("flights", "arr_delay", "categorical")
    assert before.split("# end of dataset")[1] == params.read_text().split("# end of dataset")[1]  # comments kept
    from tasks.datasets import use_dataset

    use_dataset(str(ROOT / "data/datasets/california_housing.yaml"), params)
    assert params.read_text() == before
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.datasets", "use", "nope"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and "shipped datasets: ['adult', 'california_housing', 'fashion_mnist', 'flights']" in proc.stderr


def test_the_shipped_datasets_are_valid():
    for path in sorted((ROOT / "data/datasets").glob("*.yaml")):
        raw = project_params()
        raw["dataset"] = yaml.safe_load(path.read_text())["dataset"]
        raw["evaluate"]["primary"] = PRIMARY[raw["dataset"]["task"]][0]  # as `trainflow use` picks it
        for dotted, value in train_for(raw["dataset"]["modality"], raw["train"]).items():  # and the model family
            raw["train"][dotted.split(".")[1]] = value
        s = parse_settings(raw)
        assert (ROOT / s.dataset.source).exists() and (ROOT / s.dataset.suite).exists()
