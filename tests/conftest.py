"""Shared fixtures: small slices of the real California Housing data in temporary workspaces."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks.settings import Settings, parse_settings

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "data/sources/california_housing.parquet"
PATH_KEYS = [("ingest", "out"), ("validate", "report"), ("preprocess", "out_dir"), ("train", "out_dir"),
             ("train", "log_dir"), ("evaluate", "out_dir"), ("package", "out_dir")]

os.environ.setdefault("DO_NOT_TRACK", "1")


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
    raw["ingest"].update(source=str(source), sha256=None)
    raw["validate"]["suite"] = str(ROOT / raw["validate"]["suite"])
    raw["dask"]["n_workers"] = 1
    raw["train"].update(world_size=1, epochs=4, batch_size=128, hidden=[32, 32], patience=10, dropout=0.0, lr=0.01)
    for dotted, value in overrides.items():
        *path, last = dotted.split("__")
        node = raw
        for p in path:
            node = node[p]
        node[last] = value
    return raw


def workspace(root: Path, frame: pd.DataFrame | None = None, **overrides) -> Settings:
    """A workspace with a source file (default: the real slice) and its settings (also written to params.yaml)."""
    root.mkdir(parents=True, exist_ok=True)
    source = root / "source.parquet"
    (real_slice() if frame is None else frame).to_parquet(source, index=False)
    raw = small_params(root, source, **overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return parse_settings(raw)


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
