"""The champion/challenger gate on real trained models: first model vs the train-mean baseline, a worse
candidate kept, a better one promoted atomically, a corrupt champion refused; plus the package archive,
model card and evaluation outputs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.evaluate import decide, evaluate
from tasks.files import sha256_file
from tasks.package import load_package, package
from tasks.promote import promote
from tasks.settings import UserError, parse_settings
from tasks.train import train
from tests.conftest import variant


def candidate(features, root: Path, champion: Path, **train_overrides):
    raw = variant(features, root, **train_overrides).model_dump(by_alias=True)
    raw["evaluate"]["champion"] = str(champion)
    raw["package"].update(out_dir=str(root / "package"), archive=str(root / "package.tar.gz"))
    return parse_settings(raw)


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


def test_first_model_is_promoted_when_it_beats_the_train_mean(champion):
    root, s, result = champion
    assert result["promoted"] and "vs the train-mean baseline" in result["message"]
    gate = json.loads((Path(s.evaluate.out_dir) / "gate.json").read_text())
    assert gate["decision"] == "promote" and gate["against"] == "the train-mean baseline"
    assert gate["candidate"] < gate["reference"]  # RMSE of the model < RMSE of predicting the mean
    production = load_package(root / "production")  # a complete, verified package
    assert production.manifest["metrics"]["rmse"] == gate["candidate"]
    assert json.loads((root / "production/promotion.json").read_text())["gate"]["message"].startswith("promote:")


def test_a_worse_candidate_is_not_promoted_and_production_is_untouched(features, champion):
    root, _, _ = champion
    before = {p.name: sha256_file(p) for p in (root / "production").iterdir()}
    s = candidate(features, root / "weak", root / "production", **WEAK)
    result = run(s)
    assert not result["promoted"]
    assert result["message"].startswith("not promoted: test RMSE ") and f"vs champion {root / 'production'} " in result["message"]
    assert "better; needed > 0.00%" in result["message"] and "(-" in result["message"]  # a negative margin, named
    metrics = json.loads((Path(s.evaluate.out_dir) / "metrics.json").read_text())
    assert metrics["promote"] == 0 and metrics["champion"]["rmse"] < metrics["rmse"]
    assert {p.name: sha256_file(p) for p in (root / "production").iterdir()} == before


def test_the_same_model_again_is_not_an_improvement(features, champion):
    root, _, _ = champion
    s = candidate(features, root / "same", root / "production", **STRONG)  # same data, seed, params: same model
    result = run(s)
    assert not result["promoted"] and "(+0.00% better; needed > 0.00%)" in result["message"]


def test_a_better_candidate_replaces_the_champion_and_the_previous_one_is_kept(features, champion, tmp_path):
    root, _, _ = champion
    production = tmp_path / "production"
    shutil.copytree(root / "production", production)
    old = sha256_file(production / "manifest.json")
    s = candidate(features, tmp_path / "better", production, epochs=40, lr=0.01, patience=40, hidden=[64, 64])
    result = run(s)
    assert result["promoted"], result["message"]
    assert sha256_file(production / "manifest.json") != old
    assert sha256_file(tmp_path / "production.previous/manifest.json") == old  # for a rollback
    assert load_package(production).manifest["metrics"]["rmse"] < load_package(tmp_path / "production.previous").manifest["metrics"]["rmse"]


def test_a_corrupt_champion_stops_the_gate_instead_of_being_replaced(features, champion, tmp_path):
    root, _, _ = champion
    production = tmp_path / "production"
    shutil.copytree(root / "production", production)
    with open(production / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    before = sha256_file(production / "model.onnx")
    s = candidate(features, tmp_path / "c", production, **STRONG)
    train(s)
    with pytest.raises(UserError, match=r"the champion at .*production cannot be scored: .*model.onnx does not match its "
                                        r"sha256 .*The gate does not promote over a model it cannot check"):
        evaluate(s)
    assert sha256_file(production / "model.onnx") == before and not (tmp_path / "c/eval/gate.json").exists()


def test_promote_refuses_when_the_champion_changed_after_the_gate(features, champion, tmp_path):
    root, _, _ = champion
    production = tmp_path / "production"
    s = candidate(features, tmp_path / "c", production, **WEAK)  # no champion yet: compared with the baseline
    train(s)
    evaluate(s)
    package(s)
    shutil.copytree(root / "production", production)  # someone promoted meanwhile
    with pytest.raises(UserError, match="changed since the gate compared against it; rerun the evaluate stage"):
        promote(s)


def test_a_slice_that_gets_worse_blocks_promotion():
    cfg = parse_settings(json.loads(json.dumps(variant.__globals__["project_params"]()))).evaluate
    cand = {"rmse": 0.9, "mae": 0.5, "r2": 0.8, "mape": 0.1, "n": 1000}
    champ = {"rmse": 1.0, "mae": 0.6, "r2": 0.7, "mape": 0.2, "n": 1000}
    slices_c = {"region": {"north": {**cand, "rmse": 1.3, "n": 200}, "south": {**cand, "rmse": 0.8, "n": 800}}}
    slices_r = {"region": {"north": {**champ, "rmse": 1.1, "n": 200}, "south": {**champ, "rmse": 0.98, "n": 800}}}
    gate = decide(cfg, cand, champ, "champion P", slices_c, slices_r)
    assert gate["decision"] == "keep"
    assert gate["message"] == ("not promoted: test RMSE 0.9000 vs champion P 1.0000 (+10.00% better; needed > 0.00%), but 1 "
                               "slice(s) got worse by more than 5%, e.g. region=north (n=200): RMSE 1.3000 vs 1.1000 (+18.2%)")
    slices_r["region"]["north"]["n"] = 10  # too few rows to judge
    assert decide(cfg, cand, champ, "champion P", slices_c, slices_r)["decision"] == "promote"


def test_evaluation_outputs_slices_plots_and_the_archive(champion):
    _, s, _ = champion
    out = Path(s.evaluate.out_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"rmse", "mae", "r2", "mape", "n", "baseline", "promote"} and 0 < metrics["mape"] < 1
    slices = json.loads((out / "slices.json").read_text())["candidate"]
    assert set(slices) == {"MedInc", "Latitude"}
    for by in slices.values():  # quantile bins: every test row in exactly one
        assert len(by) == 4 and sum(v["n"] for v in by.values()) == metrics["n"]
    residuals = pd.read_csv(out / "residuals.csv")
    assert list(residuals.columns) == ["residual", "count"] and residuals["count"].sum() == metrics["n"]
    for png in ("pred_vs_actual.png", "residuals.png", "learning_curve.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # the archive is the same package: same files, same predictions
    from_dir, from_tar = load_package(s.package.out_dir), load_package(s.package.archive)
    assert from_tar.manifest == from_dir.manifest
    raw = pd.read_parquet(Path(s.preprocess.out_dir) / "test_raw")
    np.testing.assert_array_equal(from_tar.predict(raw), from_dir.predict(raw))
    card = (Path(s.package.out_dir) / "MODEL_CARD.md").read_text()
    for part in ("## Intended use", "## Data", "## Metrics (held-out test split)", "### By MedInc", "## Limitations",
                 "## Training", f"{metrics['rmse']:.4f}"):
        assert part in card
    manifest = from_dir.manifest
    assert manifest["trainflow_version"] == "0.1.0" and manifest["data"]["dvc"]["params_sha256"]
    assert manifest["files"]["MODEL_CARD.md"] == sha256_file(Path(s.package.out_dir) / "MODEL_CARD.md")


def test_an_archive_that_is_not_a_package_is_refused(tmp_path):
    bad = tmp_path / "model.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(UserError, match="not a readable package archive"):
        load_package(bad)
