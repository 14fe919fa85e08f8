"""Warm start (train.init_from): continual training on real appended flights months, lineage, and bad parents."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tasks.evaluate import evaluate
from tasks.files import sha256_file
from tasks.package import package
from tasks.preprocess import preprocess
from tasks.promote import promote
from tasks.settings import UserError, edit_params
from tasks.train import train
from tasks.training.model import embedding_dim
from tests.conftest import ROOT, STAGES, cli_root, copy_repo, parse, run_until_preprocess, same_parameters, sh, variant
from tests.harness import snapshot
from tests.test_flights import flights_slice, flights_workspace

EVERY = 20  # every 20th flight of 2013: 16,839 rows, 11,247 of them in January to August
TRAIN = {"train__hidden": [64, 64], "train__batch_size": 256, "train__lr": 0.003, "train__patience": 100}


def months(last: int):
    frame = flights_slice(EVERY)
    return frame[frame["month"] <= last].reset_index(drop=True)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """The first model: from scratch on January to August, 6 epochs, packaged and promoted (its workspace's
    champion). Its settings and the champion's sha256 (of its manifest.json)."""
    s = flights_workspace(tmp_path_factory.mktemp("early"), months(8), train__epochs=6, **TRAIN)
    run_until_preprocess(s)
    train(s)
    evaluate(s)
    package(s)
    promote(s)
    return s, sha256_file(Path(s.evaluate.champion) / "manifest.json")


def warm_workspace(root: Path, parent, **overrides):
    """All twelve months (January to August's rows and the appended September to December), warm-started from
    the parent's champion (train.init_from: production), gated against it."""
    first, sha = parent
    return flights_workspace(
        root,
        flights_slice(EVERY),
        evaluate__champion=first.evaluate.champion,
        train__init_from="production",
        train__init_sha256=sha,
        **TRAIN | overrides,
    )


@pytest.mark.slow
def test_warm_start_on_appended_months_reaches_the_scratch_model_in_half_the_epochs(parent, tmp_path):
    first, sha = parent
    scratch = flights_workspace(tmp_path / "scratch", flights_slice(EVERY), train__epochs=6, **TRAIN)
    run_until_preprocess(scratch)
    train(scratch)
    reference = evaluate(scratch)["rmse"]

    warm = warm_workspace(tmp_path / "warm", parent, train__epochs=3)
    run_until_preprocess(warm)
    # preprocess applied the parent's transform (fitted on January to August) instead of fitting one
    features = Path(warm.preprocess.out_dir)
    assert json.loads((features / "transform.json").read_text()) == json.loads(
        (Path(first.package.out_dir) / "transform.json").read_text()
    )
    assert json.loads((features / "schema.json").read_text())["transform_from"] == {"path": "production", "package_sha256": sha}
    summary = train(warm)
    assert summary["parent"]["package_sha256"] == sha and summary["parent"]["reinitialised"] == {}
    assert summary["epochs_run"] == 3
    warmed = evaluate(warm)

    # in half the epochs, the test RMSE of the model trained from scratch on all the months; from scratch, as
    # many epochs do not get there
    short = variant(scratch, tmp_path / "short", epochs=3)
    train(short)
    assert warmed["rmse"] <= reference < evaluate(short)["rmse"]

    # the gate still decides: the warm model was compared with its parent, the champion, on this run's test rows
    gate = json.loads((Path(warm.evaluate.out_dir) / "gate.json").read_text())
    assert gate["champion"]["manifest_sha256"] == sha and gate["decision"] == "promote"
    assert gate["compared"]["champion"]["rmse"] > warmed["rmse"]

    # the lineage: the parent's sha256 and run in the manifest and the model card
    package(warm)
    manifest = json.loads((Path(warm.package.out_dir) / "manifest.json").read_text())
    parent_manifest = json.loads((Path(first.evaluate.champion) / "manifest.json").read_text())
    assert manifest["parent"]["package_sha256"] == sha and manifest["parent"]["kind"] == "package"
    assert manifest["parent"]["created"] == parent_manifest["created"]
    assert manifest["parent"]["git_commit"] == parent_manifest["git"]["commit"]
    assert "model.pt" in manifest["files"]
    card = (Path(warm.package.out_dir) / "MODEL_CARD.md").read_text()
    assert f"Warm-started from the package `production` (manifest sha256 `{sha}`" in card
    assert "its feature transform reused" in card


def test_refit_keeps_the_layers_whose_shapes_match_and_names_the_others(parent, tmp_path):
    first, _ = parent
    warm = warm_workspace(tmp_path, parent, train__epochs=1, train__init_transform="refit")
    run_until_preprocess(warm)
    summary = train(warm)
    # the vocabularies were refitted on twelve months: the embeddings of the columns whose vocabulary changed
    # start anew, every other layer is the parent's
    old = json.loads((Path(first.package.out_dir) / "transform.json").read_text())["categorical"]
    new = json.loads((Path(warm.preprocess.out_dir) / "transform.json").read_text())["categorical"]
    changed = [i for i, c in enumerate(new) if len(new[c]["vocabulary"]) != len(old[c]["vocabulary"])]
    assert changed  # (more rows: more tail numbers reach preprocess.min_frequency)

    # and the first layer's weight when the embeddings' total width changed with them
    def width(categorical):
        return sum(embedding_dim(len(v["vocabulary"]) + 1) for v in categorical.values())

    first_layer = {"net.0.weight"} if width(new) != width(old) else set()
    assert set(summary["parent"]["reinitialised"]) == {f"inputs.embeddings.{i}.weight" for i in changed} | first_layer
    assert {"inputs.numeric", "inputs.numeric.encode", "net.2", "net.4"} <= set(summary["parent"]["kept"])
    assert json.loads((Path(warm.preprocess.out_dir) / "schema.json").read_text())["transform_from"] is None
    # reuse needs features encoded with the parent's transform (which the preprocess stage then applies)
    with pytest.raises(UserError, match="were not encoded with the transform of .*; rerun the preprocess stage"):
        train(variant(warm, tmp_path / "reuse", init_transform="reuse"))


def test_from_a_checkpoint_the_first_epoch_starts_where_the_parent_ended(trained, tmp_path):
    model = Path(trained.train.out_dir) / "model.pt"
    s = variant(trained, tmp_path, epochs=1, init_from=str(model), init_sha256=sha256_file(model), init_transform="refit")
    summary = train(s)
    assert summary["parent"] == {
        "kind": "checkpoint",
        "path": str(model),
        "sha256": sha256_file(model),
        "init_transform": "refit",
        "kept": summary["parent"]["kept"],
        "reinitialised": {},
    }
    before = json.loads((Path(trained.train.out_dir) / "summary.json").read_text())
    # one epoch from the parent's weights is better than the parent's best: it continues, not restarts
    assert summary["epochs"][0]["val_loss"] < before["epochs"][0]["val_loss"] / 2


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/trainflow-pwned",))


def test_a_pickled_object_in_a_checkpoint_is_refused_not_run(trained, tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Evil()}, evil)
    s = variant(trained, tmp_path / "run", epochs=1, init_from=str(evil), init_sha256=sha256_file(evil), init_transform="refit")
    with pytest.raises(UserError, match="holds objects a Trainflow model never does, and was not unpickled"):
        train(s)
    assert not Path("/tmp/trainflow-pwned").exists() and not (tmp_path / "run/model").exists()


def test_the_parent_is_pinned_by_its_sha256(packaged, tmp_path):
    _, _, s = packaged
    pkg = s.package.out_dir
    sha = sha256_file(Path(pkg) / "manifest.json")
    with pytest.raises(UserError, match=f"not train.init_sha256={'0' * 64}: the parent changed .* set train.init_sha256: {sha}"):
        train(variant(s, tmp_path, init_from=pkg, init_sha256="0" * 64))
    with pytest.raises(UserError, match="no champion yet for this dataset"):
        train(variant(s, tmp_path, init_from="production", init_sha256=sha))
    assert not (tmp_path / "model").exists()
    # unpinned: the parent is what init_from is now (a scheduled run's `production`), recorded in the lineage
    summary = train(variant(s, tmp_path / "unpinned", init_from=pkg, epochs=1))
    assert summary["parent"]["package_sha256"] == sha and summary["parent"]["kept"]


def test_init_from_and_resume_from_together_are_refused(trained):
    raw = trained.model_dump(by_alias=True)
    raw["train"].update(init_from="production", resume_from="models/train/checkpoints/step-00000001.pt")
    with pytest.raises(UserError, match="train.resume_from continues a run exactly .* set one of them to null"):
        parse(raw)


def cli(module: str, s) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module],
        cwd=cli_root(s),
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE"),
    )


def test_a_parent_of_another_dataset_stops_the_train_cli_naming_what_differs(parent, trained):
    first, sha = parent
    raw = trained.model_dump(by_alias=True)
    raw["train"].update(init_from=first.package.out_dir, init_sha256=sha)
    s = parse(raw)
    before = snapshot(Path(trained.train.out_dir).parent)
    proc = cli("tasks.train", s)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert 'dataset: "flights" there, "california_housing" here' in err and 'target: "arr_delay" there, "MedHouseVal" here' in err
    assert "columns: dep_time only there (numeric)" in err and "MedInc only here (numeric)" in err
    assert "Traceback" not in err
    assert snapshot(Path(trained.train.out_dir).parent) == before  # the model trained before is kept


def test_a_column_dropped_since_the_parent_stops_the_preprocess_cli_naming_it(packaged):
    _, _, s = packaged
    raw = s.model_dump(by_alias=True)
    raw["dataset"]["columns"]["Population"] = "ignore"
    raw["train"].update(init_from=s.package.out_dir, init_sha256=sha256_file(Path(s.package.out_dir) / "manifest.json"))
    before = snapshot(Path(s.preprocess.out_dir))
    proc = cli("tasks.preprocess", parse(raw))
    assert proc.returncode == 2, proc.stderr
    assert "columns: Population only there (numeric)" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(Path(s.preprocess.out_dir)) == before
    with pytest.raises(UserError, match="Population only there"):  # (the same through the function the flow calls)
        preprocess(parse(raw))


@pytest.mark.slow
def test_dvc_records_the_parent_and_reruns_preprocess_and_train_when_the_pin_changes(reproduced, tmp_path):
    repo = copy_repo(reproduced, tmp_path / "repo")  # `dvc repro` done once: its model is the champion
    sha = sha256_file(repo / "models/production/manifest.json")
    params = (repo / "params.yaml").read_text()
    changes = {"train.init_from": "production", "train.init_sha256": sha, "train.epochs": 2}
    (repo / "params.yaml").write_text(edit_params(params, changes))
    out = sh(repo, "dvc", "repro").stdout
    assert [s for s in STAGES if f"Running stage '{s}'" in out] == ["preprocess", "train", "evaluate", "package", "promote"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert lock["preprocess"]["params"]["params.yaml"]["train.init_sha256"] == sha
    assert lock["train"]["params"]["params.yaml"]["train"]["init_sha256"] == sha
    assert json.loads((repo / "models/package/manifest.json").read_text())["parent"]["package_sha256"] == sha
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}

    # another pin: DVC reruns the stage, which stops, naming both hashes, and keeps the model it had
    before = snapshot(repo / "models/train")
    (repo / "params.yaml").write_text(edit_params(params, changes | {"train.init_sha256": "0" * 64}))
    failed = sh(repo, "dvc", "repro", check=False)
    assert failed.returncode != 0
    assert f"has sha256 {sha}, not train.init_sha256={'0' * 64}: the parent changed" in failed.stdout + failed.stderr
    assert snapshot(repo / "models/train") == before


def test_a_warm_start_on_two_ranks_matches_one_process(trained, tmp_path):
    """The parent's weights are loaded before DDP wraps the model: 2 ranks give the parameters of 1 process."""
    model = Path(trained.train.out_dir) / "model.pt"
    warm = {"init_from": str(model), "init_sha256": sha256_file(model), "init_transform": "refit", "epochs": 2}
    one = train(variant(trained, tmp_path / "one", world_size=1, **warm))
    two = train(variant(trained, tmp_path / "two", world_size=2, **warm))
    assert one["parent"] == two["parent"] and two["world_size"] == 2
    same_parameters(tmp_path / "one/model", tmp_path / "two/model", atol=1e-5)
