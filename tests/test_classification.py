"""Classification on real data (a slice of Adult census income): binary and multiclass through every stage,
metrics cross-checked with scikit-learn, DDP = one process, exact resume, the package's probabilities, predict's
labels, and the refusals (one class, a float target as classes, unseen labels, missing classes)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tasks.errors import UserError
from tasks.evaluate import evaluate
from tasks.ingest import ingest
from tasks.metrics import class_report, classification_metrics, confusion_matrix
from tasks.package import package
from tasks.preprocess import preprocess
from tasks.train import train
from tasks.validate import validate
from tests.conftest import ROOT, load_package, parse, same_parameters, small_params, variant

ADULT = ROOT / "data/sources/adult.parquet"
ADULT_DATASET = yaml.safe_load((ROOT / "data/datasets/adult.yaml").read_text())["dataset"]


def adult_slice(step: int = 8) -> pd.DataFrame:
    """Every `step`-th row of Adult (6,106 real rows at step 8)."""
    return pd.read_parquet(ADULT).iloc[::step].reset_index(drop=True)


def adult_workspace(root: Path, frame: pd.DataFrame | None = None, dataset: dict | None = None, **overrides):
    """A workspace training on an Adult slice (binary income unless `dataset` changes it)."""
    root.mkdir(parents=True, exist_ok=True)
    source = root / "source.parquet"
    (adult_slice() if frame is None else frame).to_parquet(source, index=False)
    mine = {k.removeprefix("dataset__"): v for k, v in overrides.items() if k.startswith("dataset__")}
    raw = small_params(root, source, **{k: v for k, v in overrides.items() if not k.startswith("dataset__")})
    suite = str(ROOT / ADULT_DATASET["suite"])
    raw["dataset"] = dict(ADULT_DATASET, source=str(source), sha256=None, suite=suite) | (dataset or {}) | mine
    raw["evaluate"]["primary"] = overrides.get("evaluate__primary", "roc_auc")
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return parse(raw)


def multiclass(root: Path, **overrides):
    """The same rows, predicting `relationship` (6 classes) with income as a feature."""
    columns = {k: v for k, v in ADULT_DATASET["columns"].items() if k != "relationship"} | {"income": "categorical"}
    dataset = {"task": "multiclass", "target": "relationship", "columns": columns, "slices": ["gender"]}
    return adult_workspace(root, dataset=dataset, evaluate__primary="accuracy", **overrides)


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    s = adult_workspace(tmp_path_factory.mktemp("binary"), train__epochs=6, train__hidden=[64, 64], train__lr=0.003)
    for stage in (ingest, validate, preprocess, train):
        stage(s)
    return s, evaluate(s), package(s)


def test_binary_through_every_stage(binary):
    s, metrics, packaged = binary
    feat = Path(s.preprocess.out_dir)
    schema, transform = json.loads((feat / "schema.json").read_text()), json.loads((feat / "transform.json").read_text())
    assert transform["classes"] == ["<=50K", ">50K"] and transform["task"] == "binary" and transform["label_dtype"] == "str"
    assert schema["classes"] == ["<=50K", ">50K"] and all(min(rows) > 100 for rows in schema["class_rows"].values())
    train_rows = schema["class_rows"]["train"]
    prior = max(train_rows) / sum(train_rows)  # the accuracy of always predicting the majority class (~0.76)
    assert set(metrics) == {
        "accuracy",
        "balanced_accuracy",
        "f1_macro",
        "log_loss",
        "roc_auc",
        "ece",
        "n",
        "promote",
        "improvement",
    }
    assert metrics["accuracy"] > prior + 0.04 and metrics["roc_auc"] > 0.85 and 0 <= metrics["ece"] < 0.1
    assert metrics["log_loss"] < 0.45 and metrics["promote"] == 1  # beats the class prior (log-loss ~0.55)
    out = Path(s.evaluate.out_dir)
    gate = json.loads((out / "gate.json").read_text())
    assert gate["primary"] == "roc_auc" and gate["against"] == "the class-prior baseline" and gate["reference"] == 0.5
    assert gate["compared"]["baseline"]["accuracy"] == pytest.approx(
        np.mean(pd.read_csv(out / "predictions.csv")["actual"] == "<=50K")
    )
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == ["actual", "predicted", "p_<=50K", "p_>50K"] and len(predictions) == metrics["n"]
    np.testing.assert_allclose(predictions[["p_<=50K", "p_>50K"]].sum(axis=1), 1, atol=1e-6)
    assert (predictions["predicted"] == np.where(predictions["p_>50K"] > 0.5, ">50K", "<=50K")).all()
    per_class = json.loads((out / "slices.json").read_text())["classes"]
    assert [per_class[c]["support"] for c in ("<=50K", ">50K")] == (
        predictions["actual"].value_counts()[["<=50K", ">50K"]]
    ).tolist()
    figures = sorted(p.name for p in (out / "figures").iterdir() if not p.name.startswith("."))
    assert figures == ["calibration.png", "confusion.png", "learning_curve.png"]
    residuals = pd.read_csv(out / "residuals.csv")  # 1 - p(actual class): in [0, 1]
    assert residuals["rows"].sum() == metrics["n"] and residuals["residual"].min() >= 0 and residuals["residual_to"].max() <= 1


def test_the_package_gives_the_evaluated_probabilities_and_predict_writes_labels(binary, tmp_path):
    s, metrics, packaged = binary
    assert packaged["parity_max_abs_diff"] < 1e-5
    pkg = load_package(s.package.out_dir)
    assert pkg.manifest["task"] == "binary" and pkg.manifest["classes"] == ["<=50K", ">50K"]
    rows = adult_slice(97).drop(columns="income")
    rows.to_csv(tmp_path / "in.csv", index=False)
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.predict", s.package.archive, str(tmp_path / "in.csv"), str(tmp_path / "out.parquet")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert list(out.columns) == ["_row", "prediction", "p_<=50K", "p_>50K"] and len(out) == len(rows)
    assert set(out["prediction"]) <= {"<=50K", ">50K"} and out["prediction"].nunique() == 2
    np.testing.assert_allclose(out[["p_<=50K", "p_>50K"]].to_numpy(), pkg.predict(rows), atol=1e-7)
    card = (Path(s.package.out_dir) / "MODEL_CARD.md").read_text()
    assert "Predicts `income` (binary: <=50K, >50K)" in card and "### By class" in card and "ROC-AUC" in card


def test_classification_metrics_agree_with_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for k in (2, 5):
        actual = rng.integers(0, k, 3000)
        logits = rng.normal(size=(3000, k)) + 1.5 * np.eye(k)[actual]
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        m = classification_metrics(actual, p)
        predicted = p.argmax(1)
        assert m["accuracy"] == pytest.approx(sk.accuracy_score(actual, predicted), abs=1e-12)
        assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(actual, predicted), abs=1e-12)
        assert m["f1_macro"] == pytest.approx(sk.f1_score(actual, predicted, average="macro"), abs=1e-12)
        assert m["log_loss"] == pytest.approx(sk.log_loss(actual, p), abs=1e-9)
        expected_auc = (
            sk.roc_auc_score(actual, p[:, 1]) if k == 2 else sk.roc_auc_score(actual, p, multi_class="ovr", average="macro")
        )
        assert m["roc_auc"] == pytest.approx(expected_auc, abs=1e-9)
        np.testing.assert_array_equal(confusion_matrix(actual, predicted, k), sk.confusion_matrix(actual, predicted))
        report = class_report(actual, predicted, k)
        np.testing.assert_allclose([r["recall"] for r in report], sk.recall_score(actual, predicted, average=None))
    tied = classification_metrics(np.array([0, 1, 0, 1]), np.array([[0.5, 0.5]] * 4))  # ties count half
    assert tied["roc_auc"] == 0.5 and tied["log_loss"] == pytest.approx(np.log(2))


@pytest.fixture(scope="module")
def multiclass_features(tmp_path_factory):
    s = multiclass(tmp_path_factory.mktemp("multiclass"), train__hidden=[32, 32])
    for stage in (ingest, validate, preprocess):
        stage(s)
    return s


def test_multiclass_trains_on_two_ranks_as_in_one_process(multiclass_features, tmp_path):
    s = multiclass_features
    transform = json.loads((Path(s.preprocess.out_dir) / "transform.json").read_text())
    assert transform["classes"] == ["Husband", "Not-in-family", "Other-relative", "Own-child", "Unmarried", "Wife"]
    one = variant(s, tmp_path / "one", world_size=1, epochs=2, patience=5)
    two = variant(s, tmp_path / "two", world_size=2, epochs=2, patience=5)
    s1, s2 = train(one), train(two)
    assert s1["steps"] == s2["steps"] and s1["best_val_accuracy"] == pytest.approx(s2["best_val_accuracy"], abs=1e-6)
    same_parameters(tmp_path / "one/model", tmp_path / "two/model", atol=1e-5)
    m = evaluate(one)
    assert m["accuracy"] > 0.6 and 0.5 < m["roc_auc"] <= 1 and m["n"] > 1000  # 6 classes; the majority is ~0.4
    probabilities = pd.read_csv(Path(one.evaluate.out_dir) / "predictions.csv").filter(like="p_")
    assert probabilities.shape[1] == 6
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-6)


@pytest.mark.slow
def test_a_killed_rank_resumes_multiclass_training_to_the_same_parameters(multiclass_features, tmp_path, monkeypatch):
    """Exact resume holds for classification: rank 1 of 2 SIGKILLed mid-run (class weights on), the group
    restarts from its checkpoint and ends with the uninterrupted run's parameters."""
    from tests.harness import fault

    run = dict(world_size=2, epochs=2, checkpoint_every="3 steps", class_weights="balanced", patience=5)
    reference = train(variant(multiclass_features, tmp_path / "ref", **run))
    for key, value in fault(f"kill:1:7:{tmp_path / 'fired'}").items():
        monkeypatch.setenv(key, value)
    summary = train(variant(multiclass_features, tmp_path / "run", **run))
    assert (tmp_path / "fired").exists() and [r["kind"] for r in summary["restarts"]] == ["infrastructure"]
    assert summary["resumed_from"]["steps"] == 6 and summary["steps"] == reference["steps"]
    assert summary["best_val_accuracy"] == pytest.approx(reference["best_val_accuracy"], abs=1e-9)
    same_parameters(tmp_path / "ref/model", tmp_path / "run/model", atol=1e-6)


def test_balanced_class_weights_raise_the_recall_of_rare_classes(multiclass_features, tmp_path):
    s = multiclass_features
    plain, weighted = (  # (8 epochs: the embedded numeric columns need more than 4 on this slice to find the rare class)
        variant(s, tmp_path / "plain", epochs=8),
        variant(s, tmp_path / "weighted", epochs=8, class_weights="balanced"),
    )
    for run in (plain, weighted):
        train(run)
        evaluate(run)
    recall = {
        name: json.loads((tmp_path / name / "eval/slices.json").read_text())["classes"]["Other-relative"]["recall"]
        for name in ("plain", "weighted")
    }
    balanced = {name: json.loads((tmp_path / name / "eval/metrics.json").read_text())["balanced_accuracy"] for name in recall}
    assert recall["weighted"] > recall["plain"] and balanced["weighted"] > balanced["plain"]


def test_a_target_with_one_class_is_refused(tmp_path):
    frame = adult_slice().assign(income="<=50K")
    s = adult_workspace(tmp_path, frame)
    ingest(s)
    validate(s)
    with pytest.raises(UserError, match=r"dataset.task=binary: 'income' has one class in the train split \(\['<=50K'\]\)"):
        preprocess(s)
    assert not Path(s.preprocess.out_dir).exists()


def test_a_float_target_as_classes_is_refused_naming_regression(tmp_path):
    from tests.conftest import workspace

    s = workspace(tmp_path, frame=_float_rows(12_000), dataset__task="multiclass", evaluate__primary="accuracy")
    ingest(s)
    validate(s)
    with pytest.raises(
        UserError,
        match=r"has [\d,]+ distinct values in the train split, more than 1,000 classes: .* set dataset.task: regression",
    ):
        preprocess(s)


def _float_rows(n: int) -> pd.DataFrame:
    """n real California Housing rows (repeated with jitter beyond 20,640): 10,000+ distinct targets."""
    from tests.conftest import SOURCE

    frame = pd.read_parquet(SOURCE)
    return pd.concat([frame, frame], ignore_index=True).iloc[:n].assign(MedHouseVal=np.linspace(0.2, 5.0, n))


def test_labels_missing_from_a_split_are_refused_with_their_counts(tmp_path):
    frame = adult_slice()
    frame.loc[frame.index[0], "relationship"] = "Ward"  # a seventh class of one row: in one split only
    suite = yaml.safe_load((ROOT / ADULT_DATASET["suite"]).read_text())
    del suite["columns"]["relationship"]["values"]  # (the suite would quarantine it)
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    s = multiclass(tmp_path, dataset__suite=str(tmp_path / "suite.yaml"))
    frame.to_parquet(s.dataset.source, index=False)
    ingest(s)
    validate(s)
    with pytest.raises(
        UserError,
        match=r"the (val|test) split (has no rows of 'Ward' \(train 1\)|has labels the train split lacks: 'Ward' \(1 rows\))",
    ):
        preprocess(s)


def test_balanced_weights_with_regression_are_refused():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train"]["class_weights"] = "balanced"
    with pytest.raises(UserError, match=r"train.class_weights=balanced weights classes; dataset.task=regression has none"):
        parse(raw)
    raw["train"]["class_weights"], raw["evaluate"]["primary"] = "none", "accuracy"
    with pytest.raises(UserError, match=r"evaluate.primary=accuracy does not score a regression model"):
        parse(raw)
