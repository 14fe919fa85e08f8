"""Shared fixtures: small slices of the real California Housing data in temporary workspaces."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks.settings import PATH_KEYS, Settings, edit_params, parse_settings

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "data/sources/california_housing.parquet"
STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])  # in pipeline order

os.environ.setdefault("DO_NOT_TRACK", "1")
# a Prefect server per run, stopped after it: no test leaves one running (the kept local server has its own test)
os.environ.setdefault("TRAINFLOW_PREFECT_SERVER", "temporary")


def project_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def real_slice(step: int = 10) -> pd.DataFrame:
    """Every `step`-th row of California Housing: 2,064 real rows spread over the whole state."""
    return pd.read_parquet(SOURCE).iloc[::step].reset_index(drop=True)


def small_params(root: Path, source: Path, **overrides) -> dict:
    """params.yaml for a workspace under `root`: absolute paths, a small fast training, dotted overrides."""
    raw = copy.deepcopy(project_params())
    for section, key in PATH_KEYS:
        raw[section][key] = str(root / raw[section][key])
    raw["dataset"].update(source=str(source), sha256=None)
    raw["dataset"]["suite"] = str(ROOT / project_params()["dataset"]["suite"])
    raw["dask"]["n_workers"] = 1
    raw["train"].update(world_size=1, epochs=4, batch_size=128, hidden=[32, 32], patience=10, dropout=0.0, lr=0.01)
    for dotted, value in overrides.items():
        *path, last = dotted.split("__")
        node = raw
        for p in path:
            node = node[p]
        node[last] = value
    return raw


TEST_ROOT: Path | None = None  # pytest's temporary root: the "project" every test workspace lies in


@pytest.fixture(scope="session", autouse=True)
def _test_root(tmp_path_factory):
    global TEST_ROOT
    TEST_ROOT = tmp_path_factory.getbasetemp()


def parse(raw: dict) -> Settings:
    """Settings whose output paths may lie anywhere under pytest's temporary root (as a project's would in it)."""
    return parse_settings(raw, root=TEST_ROOT)


def cli_root(s: Settings) -> Path:
    """Where to run a stage's CLI with settings `s` whose paths span several test workspaces: pytest's
    temporary root (their common project), with `s` as its params.yaml."""
    (TEST_ROOT / "params.yaml").write_text(yaml.safe_dump(s.model_dump(by_alias=True), sort_keys=False))
    return TEST_ROOT


def load_package(path):
    """A verified package (tasks.modelpackage.open_package), for assertions."""
    from tasks.modelpackage import open_package

    with open_package(path) as package:
        return package


def workspace(root: Path, frame: pd.DataFrame | None = None, **overrides) -> Settings:
    """A workspace with a source file (default: the real slice) and its settings (also written to params.yaml)."""
    root.mkdir(parents=True, exist_ok=True)
    source = root / "source.parquet"
    (real_slice() if frame is None else frame).to_parquet(source, index=False)
    raw = small_params(root, source, **overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return parse(raw)


@pytest.fixture
def ws(tmp_path) -> Settings:
    return workspace(tmp_path)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Settings:
    """A slice run through ingest, validate, preprocess and train once for the whole session."""
    from tasks.ingest import ingest
    from tasks.preprocess import preprocess
    from tasks.train import train
    from tasks.validate import validate

    s = workspace(tmp_path_factory.mktemp("trained"))
    for stage in (ingest, validate, preprocess, train):
        stage(s)
    return s


@pytest.fixture(scope="session")
def packaged(trained):
    """`trained` evaluated and packaged: (metrics, package result, settings)."""
    from tasks.evaluate import evaluate
    from tasks.package import package

    return evaluate(trained), package(trained), trained


def run_until_preprocess(s: Settings) -> dict:
    from tasks.ingest import ingest
    from tasks.preprocess import preprocess
    from tasks.validate import validate

    ingest(s)
    validate(s)
    return preprocess(s)


@pytest.fixture(scope="session")
def features(tmp_path_factory) -> Settings:
    """The real slice through ingest, validate and preprocess: the input of the train tests."""
    s = workspace(tmp_path_factory.mktemp("features"))
    run_until_preprocess(s)
    return s


def variant(s: Settings, root: Path, **train) -> Settings:
    """`s` training into (and evaluating to) `root`, with train.* overrides."""
    raw = s.model_dump(by_alias=True)
    raw["train"].update(out_dir=str(root / "model"), log_dir=str(root / "live"), **train)
    raw["evaluate"]["out_dir"] = str(root / "eval")
    return parse(raw)


def same_parameters(a: Path, b: Path, atol: float) -> None:
    """The model files a/model.pt and b/model.pt hold the same parameters, to atol."""
    import torch

    from tasks.training.model import load_model

    m1, _ = load_model(Path(a) / "model.pt")
    m2, _ = load_model(Path(b) / "model.pt")
    assert m1.state_dict().keys() == m2.state_dict().keys()
    for (name, p1), (_, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        torch.testing.assert_close(p1, p2, atol=atol, rtol=0, msg=name)


def sh(cwd: Path, *cmd: str, check: bool = True, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command with this environment's tools (dvc, python, prefect) first on PATH."""
    env = dict(env or os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DO_NOT_TRACK="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def make_repo(repo: Path, **train) -> Path:
    """A git + DVC copy of the project whose default source is the real slice, with a small fast training."""
    for name in ("tasks", "flows", "data/suites", ".dvc/plots"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore", "pyproject.toml", "prefect.yaml"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    (repo / "data/sources").mkdir(parents=True)
    real_slice().to_parquet(repo / "data/sources/slice.parquet", index=False)
    changes = {"dataset.source": "data/sources/slice.parquet", "dataset.sha256": None, "dask.n_workers": 1}
    changes.update(
        {
            f"train.{k}": v
            for k, v in dict(dict(world_size=1, epochs=3, hidden=[32, 32], batch_size=128, lr=0.01), **train).items()
        }
    )
    (repo / "params.yaml").write_text(edit_params((ROOT / "params.yaml").read_text(), changes))  # comments kept
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return repo


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> Path:
    """make_repo run once through `dvc repro` (every output there, the first model promoted): copy it with
    `copy_repo` rather than reproducing it again."""
    repo = make_repo(tmp_path_factory.mktemp("reproduced"))
    sh(repo, "dvc", "repro")
    return repo


def copy_repo(template: Path, dest: Path) -> Path:
    """A copy of a git + DVC workspace: history, DVC cache, outputs and the champion's links, as they are."""
    shutil.copytree(template, dest, symlinks=True)
    return dest
