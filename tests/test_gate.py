"""The champion/challenger gate on real trained models: first model vs the train-mean baseline, a worse
candidate kept, a better one promoted atomically, a corrupt champion refused; plus the package archive,
model card and evaluation outputs."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.errors import UserError
from tasks.evaluate import decide, evaluate
from tasks.files import sha256_file
from tasks.modelpackage import versions_dir
from tasks.package import package
from tasks.promote import promote
from tasks.train import train
from tests import conftest
from tests.conftest import ROOT, load_package, parse, variant


def candidate(features, root: Path, champion: Path, **train_overrides):
    raw = variant(features, root, **train_overrides).model_dump(by_alias=True)
    raw["evaluate"]["champion"] = str(champion)
    raw["package"].update(out_dir=str(root / "package"), archive=str(root / "package.tar.gz"))
    return parse(raw)


def run(s) -> dict:
    train(s)
    evaluate(s)
    package(s)
    return promote(s)


STRONG = dict(epochs=12, lr=0.01, patience=20)
WEAK = dict(epochs=1, lr=0.0003)


@pytest.fixture(scope="module")
def champion(features, tmp_path_factory):
    """A strong first model, promoted over the train-mean baseline."""
    root = tmp_path_factory.mktemp("gate")
    s = candidate(features, root / "strong", root / "production", **STRONG)
    result = run(s)
    return root, s, result


def copy_champion(src: Path, dst: Path) -> None:
    """A copy of a promoted champion (its link and version directories) at `dst`."""
    shutil.copytree(versions_dir(src), versions_dir(dst), symlinks=True)
    os.symlink(os.readlink(src), dst)


def test_first_model_is_promoted_when_it_beats_the_train_mean(champion):
    root, s, result = champion
    assert result["promoted"] and "vs the train-mean baseline" in result["message"]
    gate = json.loads((Path(s.evaluate.out_dir) / "gate.json").read_text())
    assert gate["decision"] == "promote" and gate["against"] == "the train-mean baseline"
    assert gate["candidate"] < gate["reference"]  # RMSE of the model < RMSE of predicting the mean
    production = load_package(root / "production")  # a complete, verified package
    assert production.manifest["metrics"]["rmse"] == gate["candidate"]
    # the champion is a link to a version named by its manifest's sha256, beside the promotion record
    version = sha256_file(root / "production/manifest.json")
    assert os.readlink(root / "production") == f".production.versions/{version}"
    record = json.loads((root / f".production.versions/{version}.json").read_text())
    assert record["gate"]["message"].startswith("promote:") and record["previous"] is None
    assert version == sha256_file(Path(s.package.out_dir) / "manifest.json")


def test_a_worse_candidate_is_not_promoted_and_production_is_untouched(features, champion):
    root, _, _ = champion
    before = {p.name: sha256_file(p) for p in (root / "production").iterdir()}
    s = candidate(features, root / "weak", root / "production", **WEAK)
    result = run(s)
    assert not result["promoted"]
    assert result["message"].startswith("not promoted: test RMSE ") and f"vs champion {root / 'production'} " in result["message"]
    assert re.search(r": \d+\.\d\d% worse \(needs more than 0.00% better\)$", result["message"])  # the margin, in words
    metrics = json.loads((Path(s.evaluate.out_dir) / "metrics.json").read_text())
    gate = json.loads((Path(s.evaluate.out_dir) / "gate.json").read_text())
    assert metrics["promote"] == 0 and metrics["improvement"] < 0 and gate["compared"]["champion"]["rmse"] < metrics["rmse"]
    assert {p.name: sha256_file(p) for p in (root / "production").iterdir()} == before


def test_the_same_model_again_is_not_an_improvement(features, champion):
    root, _, _ = champion
    s = candidate(features, root / "same", root / "production", **STRONG)  # same data, seed, params: same model
    result = run(s)
    assert not result["promoted"] and ": no better (needs more than 0.00% better)" in result["message"]


@pytest.fixture(scope="module")
def better(features, champion, tmp_path_factory):
    """A better candidate, evaluated and packaged against a copy of the champion, not yet promoted."""
    root = tmp_path_factory.mktemp("better")
    copy_champion(champion[0] / "production", root / "production")
    s = candidate(features, root / "better", root / "production", epochs=40, lr=0.01, patience=40, hidden=[64, 64])
    train(s)
    evaluate(s)
    package(s)
    return root, s


def test_a_better_candidate_replaces_the_champion_and_the_previous_one_is_kept(better, tmp_path):
    root, s = better
    production = tmp_path / "production"
    copy_champion(root / "production", production)
    old = sha256_file(production / "manifest.json")
    result = promote(s.model_copy(update={"evaluate": s.evaluate.model_copy(update={"champion": str(production)})}))
    assert result["promoted"], result["message"]
    assert sha256_file(production / "manifest.json") != old
    assert os.readlink(tmp_path / "production.previous") == f".production.versions/{old}"  # for a rollback
    assert (
        load_package(production).manifest["metrics"]["rmse"]
        < load_package(tmp_path / "production.previous").manifest["metrics"]["rmse"]
    )
    new = sha256_file(production / "manifest.json")
    assert json.loads((tmp_path / f".production.versions/{new}.json").read_text())["previous"] == old


KILLER = """
import json, os, shutil, signal, sys
from pathlib import Path
budget = int(sys.argv[2])
def killing(f):
    def call(*a, **k):
        global budget
        budget -= 1
        if budget < 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return f(*a, **k)
    return call
os.replace, os.symlink, os.unlink, shutil.copytree = (killing(f) for f in (os.replace, os.symlink, os.unlink, shutil.copytree))
from tasks.promote import promote
from tasks.settings import parse_settings
promote(parse_settings(json.loads(Path(sys.argv[1]).read_text()), root=sys.argv[3]))
"""


@pytest.mark.slow
def test_promotion_killed_at_any_step_leaves_the_old_or_the_new_champion(better, tmp_path):
    """SIGKILL before each filesystem step of promote (copy, rename, link, unlink), then run it again: at every
    point the champion is a whole, verified package, the old one or the new one, and the rerun completes."""
    from tasks.modelpackage import verified_champion

    root, s = better
    new = sha256_file(Path(s.package.out_dir) / "manifest.json")
    old = sha256_file(root / "production/manifest.json")
    seen, k = set(), 0
    while True:
        case = tmp_path / f"k{k}"
        copy_champion(root / "production", case / "production")
        raw = s.model_dump(by_alias=True)
        raw["evaluate"]["champion"] = str(case / "production")
        (case / "settings.json").write_text(json.dumps(raw))
        proc = subprocess.run(
            [sys.executable, "-c", KILLER, str(case / "settings.json"), str(k), str(conftest.TEST_ROOT)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        verified_champion(case / "production")  # whole and verified after the kill
        now = sha256_file(case / "production/manifest.json")
        assert now in (old, new), k
        seen.add(now)
        if proc.returncode == 0:
            assert now == new and k > 3, proc.stdout
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        again = subprocess.run(
            [sys.executable, "-c", KILLER, str(case / "settings.json"), "1000", str(conftest.TEST_ROOT)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.returncode == 0 and "promoted:" in again.stdout, again.stderr
        assert sha256_file(case / "production/manifest.json") == new
        k += 1
    assert seen == {old, new}  # killed before the switch and after it


def test_a_corrupt_champion_stops_the_gate_instead_of_being_replaced(features, champion, tmp_path):
    root, _, _ = champion
    production = tmp_path / "production"
    copy_champion(root / "production", production)
    with open(production / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    before = sha256_file(production / "model.onnx")
    s = candidate(features, tmp_path / "c", production, **STRONG)
    train(s)
    with pytest.raises(
        UserError,
        match=r"the champion at .*production cannot be scored: .*model.onnx does not match its "
        r"sha256 .*The gate does not promote over a model it cannot check",
    ):
        evaluate(s)
    assert sha256_file(production / "model.onnx") == before and not (tmp_path / "c/eval/gate.json").exists()
    # altered files with a manifest rewritten to match: the promotion's record (the link's target) no longer does
    manifest = json.loads((production / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = before
    (production / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="but the promotion recorded .*the champion was altered after it was promoted"):
        evaluate(s)
    # a plain directory is no promoted champion: where it came from cannot be checked
    plain = tmp_path / "plain"
    shutil.copytree(root / "production", plain)
    with pytest.raises(UserError, match=r"plain is a plain directory, not a promoted champion .*Move it away"):
        evaluate(s.model_copy(update={"evaluate": s.evaluate.model_copy(update={"champion": str(plain)})}))


def test_promote_refuses_when_the_champion_changed_after_the_gate(features, champion, tmp_path):
    root, _, _ = champion
    production = tmp_path / "production"
    s = candidate(features, tmp_path / "c", production, **WEAK)  # no champion yet: compared with the baseline
    train(s)
    evaluate(s)
    package(s)
    copy_champion(root / "production", production)  # someone promoted meanwhile
    with pytest.raises(UserError, match="changed since the gate compared against it; rerun the evaluate stage"):
        promote(s)


def test_a_slice_that_gets_worse_blocks_promotion():
    cfg = parse(json.loads(json.dumps(variant.__globals__["project_params"]()))).evaluate
    cand = {"rmse": 0.9, "mae": 0.5, "r2": 0.8, "mape": 0.1, "n": 1000}
    champ = {"rmse": 1.0, "mae": 0.6, "r2": 0.7, "mape": 0.2, "n": 1000}
    slices_c = {"region": {"north": {**cand, "rmse": 1.3, "n": 200}, "south": {**cand, "rmse": 0.8, "n": 800}}}
    slices_r = {"region": {"north": {**champ, "rmse": 1.1, "n": 200}, "south": {**champ, "rmse": 0.98, "n": 800}}}
    gate = decide(cfg, cand, champ, "champion P", slices_c, slices_r)
    assert gate["decision"] == "keep"
    assert gate["message"] == (
        "not promoted: test RMSE 0.9000 vs champion P 1.0000: 10.00% better (needs more than 0.00% better), "
        "but 1 slice(s) got worse by more than 5%, e.g. region=north (n=200): RMSE 1.3000 vs 1.1000, 18.2% worse"
    )
    slices_r["region"]["north"]["n"] = 10  # too few rows to judge
    assert decide(cfg, cand, champ, "champion P", slices_c, slices_r)["decision"] == "promote"


def test_evaluation_outputs_slices_plots_and_the_archive(champion):
    _, s, _ = champion
    out = Path(s.evaluate.out_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"rmse", "mae", "r2", "mape", "n", "promote", "improvement"} and 0 < metrics["mape"] < 1
    slices = json.loads((out / "slices.json").read_text())["candidate"]
    assert set(slices) == {"MedInc", "Latitude"}
    for by in slices.values():  # quantile bins: every test row in exactly one
        assert len(by) == 4 and sum(v["n"] for v in by.values()) == metrics["n"]
    residuals = pd.read_csv(out / "residuals.csv")
    assert list(residuals.columns) == ["residual", "residual_to", "rows"] and residuals["rows"].sum() == metrics["n"]
    assert (residuals["residual"].iloc[1:].to_numpy() == residuals["residual_to"].iloc[:-1].to_numpy()).all()  # adjacent bins
    figures = sorted(p.name for p in (out / "figures").iterdir() if not p.name.startswith("."))
    assert figures == ["learning_curve.png", "pred_vs_actual.png", "residuals.png"]  # a regression's, and no others
    for png in figures:
        assert (out / "figures" / png).read_bytes()[:4] == b"\x89PNG"
    # the archive is the same package: same files, same predictions
    from_dir, from_tar = load_package(s.package.out_dir), load_package(s.package.archive)
    assert from_tar.manifest == from_dir.manifest
    raw = pd.read_parquet(Path(s.preprocess.out_dir) / "test_raw")
    np.testing.assert_array_equal(from_tar.predict(raw), from_dir.predict(raw))
    card = (Path(s.package.out_dir) / "MODEL_CARD.md").read_text()
    for part in (
        "## Intended use",
        "## Data",
        "## Metrics (held-out test split)",
        "### By MedInc",
        "## Limitations",
        "## Training",
        f"{metrics['rmse']:.4f}",
    ):
        assert part in card
    manifest = from_dir.manifest
    assert manifest["trainflow_version"] == "0.1.0" and manifest["data"]["dvc"]["params_sha256"]
    assert manifest["files"]["MODEL_CARD.md"] == sha256_file(Path(s.package.out_dir) / "MODEL_CARD.md")


def test_an_archive_that_is_not_a_package_is_refused(tmp_path):
    bad = tmp_path / "model.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(UserError, match="not a readable package archive"):
        load_package(bad)
