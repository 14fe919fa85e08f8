"""`dvc repro` end to end in a temporary git + DVC copy of the project."""

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_repo, sh

STAGES = ["ingest", "validate", "preprocess", "train", "evaluate", "package", "promote"]


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
    assert (repo / "models/production/manifest.json").exists()  # the first model beat the train mean: promoted

    again = sh(repo, "dvc", "repro")
    assert "Data and pipelines are up to date." in again.stdout
    for stage in STAGES:
        assert f"Running stage '{stage}'" not in again.stdout
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}


def test_changing_a_train_param_reruns_only_downstream_stages(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first model")
    out = sh(repo, "dvc", "repro").stdout
    ran = [s for s in STAGES if f"Running stage '{s}'" in out]
    assert ran == ["train", "evaluate", "package", "promote"]
    assert json.loads((repo / "models/train/summary.json").read_text())["epochs_run"] == 2
    assert "not promoted: test RMSE " in out  # 2 epochs lose to the 3-epoch champion
    # against the last commit: the metrics and the plots
    diff = json.loads(sh(repo, "dvc", "metrics", "diff", "--json").stdout)["reports/evaluate/metrics.json"]
    assert diff["rmse"]["diff"] > 0 and diff["promote"] == {"old": 1, "new": 0, "diff": -1}
    plots = json.loads(sh(repo, "dvc", "plots", "diff", "--json").stdout)["data"]
    assert {"reports/evaluate/predictions.csv", "reports/evaluate/residuals.csv", "reports/evaluate/residuals.png",
            "reports/evaluate/learning_curve.png", "reports/train/plots/metrics/val/rmse.tsv"} <= set(plots)
    assert set(plots["reports/evaluate/residuals.csv"][0]["revisions"]) == {"HEAD", "workspace"}  # side by side
