"""`dvc repro` end to end in a temporary git + DVC copy of the project."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, project_params, real_slice

STAGES = ["ingest", "validate", "preprocess", "train", "evaluate", "package"]


def sh(repo: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DO_NOT_TRACK="1")
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    for name in ("tasks", "data/suites"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    (repo / "data/sources").mkdir(parents=True)
    real_slice().to_parquet(repo / "data/sources/slice.parquet", index=False)
    params = project_params()
    params["ingest"].update(source="data/sources/slice.parquet", sha256=None)
    params["dask"]["n_workers"] = 1
    params["train"].update(world_size=1, epochs=3, hidden=[32, 32], batch_size=128, lr=0.01)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return repo


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
