"""`dvc repro` end to end in a temporary git + DVC copy of the project."""

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_repo, sh

STAGES = ["ingest", "validate", "preprocess", "train", "evaluate", "package"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("repo"))


def test_repro_runs_every_stage_then_is_a_no_op(repo):
    sh(repo, "dvc", "repro")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES
    metrics = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert 0 < metrics["rmse"] < 0.9
    assert (repo / "models/package/model.onnx").exists()
    assert (repo / ".dvc/cache").exists()  # outputs are in the DVC cache

    again = sh(repo, "dvc", "repro")
    assert "Data and pipelines are up to date." in again.stdout
    for stage in STAGES:
        assert f"Running stage '{stage}'" not in again.stdout
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}


def test_changing_a_train_param_reruns_only_downstream_stages(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(repo, "dvc", "repro").stdout
    ran = [s for s in STAGES if f"Running stage '{s}'" in out]
    assert ran == ["train", "evaluate", "package"]
    assert json.loads((repo / "models/train/summary.json").read_text())["epochs_run"] == 2
