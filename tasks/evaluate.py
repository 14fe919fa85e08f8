"""Score the trained model on the held-out test split and decide whether it replaces the champion.
Run: python -m tasks.evaluate

Writes to evaluate.out_dir:
- metrics.json (a DVC metric: `dvc metrics diff`): regression RMSE, MAE, R², MAPE in the target's units (and
  rmse_transformed with a dataset.target_transform); classification accuracy, balanced accuracy, macro-F1,
  log-loss, ROC-AUC and expected calibration error; with `promote` and the improvement;
- slices.json: the same metrics per slice (each category, or quantile bin, of the dataset.slices columns), and
  for classification per class precision, recall, F1 and support;
- gate.json: the champion/challenger decision (promote or keep), with the metric and the margin, and the
  champion's and the baseline's metrics on the same rows;
- predictions.csv: actual and predicted (classification: labels, then one probability column per class), a
  DVC plot (scatter, or confusion matrix); residuals.csv: the histogram of predicted - actual (classification:
  of 1 - the probability of the actual class);
- figures/: PNGs: pred_vs_actual and residuals (regression), confusion and calibration (classification),
  learning_curve.

The gate: the champion is the promoted package (evaluate.champion), scored here by its own transform and
model on the raw test rows. It must be a model of the same dataset, target, target transform, task, classes
and input columns, or the gate stops naming what differs: it never compares (let alone promotes over) a model
that predicts something else. The candidate must beat it by evaluate.min_improvement on evaluate.primary
(in the metric's direction), and no slice of at least MIN_SLICE_ROWS rows may get worse by more than
evaluate.max_slice_regression. With no champion, the candidate must beat the baseline: the train mean
(regression) or the train split's class frequencies (classification). A champion that fails its checks
(altered, incomplete, unreadable) stops the run. The promote stage (tasks/promote.py) acts on the decision.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tasks.errors import UserError
from tasks.files import atomic_path, sha256_file, write_json
from tasks.metrics import NAMES, class_report, compared, improvement, task_metrics
from tasks.modelpackage import check_comparable, identity, split_of
from tasks.paths import champion_path
from tasks.settings import Settings, cli
from tasks.training.data import EVAL_CHUNK, load_split
from tasks.training.model import load_model, servable

IMAGE_CHUNK = 256  # images scored at once (a convolution's activations are large)
MIN_SLICE_ROWS = 30  # smaller slices are reported but not gated: their metrics are mostly noise
TOP_CATEGORIES = 20
ROUNDING = 1e-6  # a smaller relative difference is float rounding (the same model scored by torch and by ONNX)


def predict(model: torch.nn.Module, meta: dict, x: torch.Tensor) -> np.ndarray:
    """Model inputs -> predictions in target units, or class probabilities (n, K): the package's own head."""
    head, _ = servable(model, meta)
    with torch.no_grad():
        out = torch.cat([head(c) for c in x.split(EVAL_CHUNK if x.dim() == 2 else IMAGE_CHUNK)]) if len(x) else torch.empty(0)
    return out.double().numpy()


def slice_labels(column: pd.Series, kind: str, bins: int) -> pd.Series:
    """The slice of each row: its category (the most frequent ones; 'other' for the rest; 'missing'), or its
    quantile bin of the column as '[lo, hi)'."""
    if kind == "categorical":
        values = column.astype("string").fillna("missing")
        top = values.value_counts().index[:TOP_CATEGORIES]
        return values.where(values.isin(top), "other").astype(object)
    numbers = pd.to_numeric(column, errors="coerce")
    edges = np.unique(np.nanquantile(numbers, np.linspace(0, 1, bins + 1))) if numbers.notna().any() else np.array([])
    if len(edges) < 2:
        return pd.Series("all", index=column.index, dtype=object)
    codes = np.clip(np.searchsorted(edges, numbers, side="right") - 1, 0, len(edges) - 2)
    names = np.array(
        [f"[{edges[i]:.4g}, {edges[i + 1]:.4g}{']' if i == len(edges) - 2 else ')'}" for i in range(len(edges) - 1)], dtype=object
    )
    return pd.Series(np.where(numbers.isna(), "missing", names[codes]), index=column.index, dtype=object)


def slice_metrics(raw: pd.DataFrame, actual: np.ndarray, predicted: np.ndarray, s: Settings) -> dict:
    """{column: {slice: metrics}} for every dataset.slices column."""
    out = {}
    transform = s.dataset.target_transform
    for col in s.dataset.slices:
        labels = slice_labels(raw[col], s.dataset.columns[col], s.evaluate.slice_bins).to_numpy()
        out[col] = {
            str(lab): task_metrics(actual[labels == lab], predicted[labels == lab], transform) for lab in pd.unique(labels)
        }
    return out


def score_champion(s: Settings, raw: pd.DataFrame, candidate: dict) -> dict | None:
    """The champion package's predictions on the same test rows; None when there is no champion."""
    from tasks.modelpackage import ModelPackage, verified_champion

    path = champion_path(s.evaluate.champion)
    if not path.exists() and not path.is_symlink():
        return None
    try:
        champion = ModelPackage(*verified_champion(path))
        check_comparable(identity({**champion.manifest, "transform": champion.transform}), candidate, path)
        predicted = champion.predict(raw)
    except UserError as e:
        if str(e).startswith("evaluate: the champion"):
            raise
        raise UserError(
            f"evaluate: the champion at {path} cannot be scored: {e}. The gate does not promote over a model it "
            f"cannot check: restore {path} (e.g. from the last promoted package), or remove it deliberately "
            "to make the next model the first champion"
        ) from None
    return {
        "path": str(path),
        "manifest_sha256": sha256_file(path / "manifest.json"),
        "created": champion.manifest.get("created"),
        "predicted": predicted,
    }


def decide(cfg, candidate: dict, reference: dict, against: str, cand_slices: dict, ref_slices: dict | None) -> dict:
    """Promote only a candidate better than the reference by min_improvement, with no slice regressed too far."""
    metric = cfg.primary
    c, r = candidate[metric], reference[metric]
    if c is None:
        raise UserError(f"evaluate: the candidate's {metric} is undefined on this test split; choose another evaluate.primary")
    gain = improvement(metric, c, r) if r is not None else float("inf")
    worse = []
    for col, slices in (ref_slices or {}).items():
        for name, ref in slices.items():
            cand = cand_slices.get(col, {}).get(name)
            if cand is None or ref["n"] < MIN_SLICE_ROWS or not ref[metric] or cand[metric] is None:
                continue
            regression = -improvement(metric, cand[metric], ref[metric])
            if regression > cfg.max_slice_regression:
                worse.append(
                    {
                        "slice": f"{col}={name}",
                        "n": ref["n"],
                        "candidate": cand[metric],
                        "champion": ref[metric],
                        "regression": regression,
                    }
                )
    name = NAMES[metric]
    shown = "n/a" if r is None else f"{r:.4f}"
    verdict = (
        f"test {name} {c:.4f} vs {against} {shown}: {compared(metric, c, r)} (needs more than {cfg.min_improvement:.2%} better)"
    )
    if not gain > max(cfg.min_improvement, ROUNDING):
        decision, message = "keep", f"not promoted: {verdict}"
    elif worse:
        w = max(worse, key=lambda x: x["regression"])
        decision = "keep"
        message = (
            f"not promoted: {verdict}, but {len(worse)} slice(s) got worse by more than "
            f"{cfg.max_slice_regression:.0%}, e.g. {w['slice']} (n={w['n']:,}): {name} {w['candidate']:.4f} vs "
            f"{w['champion']:.4f}, {w['regression']:.1%} worse"
        )
    else:
        decision, message = "promote", f"promote: {verdict}"
    return {
        "decision": decision,
        "message": message,
        "against": against,
        "primary": metric,
        "candidate": c,
        "reference": r,
        "improvement": gain,
        "min_improvement": cfg.min_improvement,
        "max_slice_regression": cfg.max_slice_regression,
        "slices_worse": worse,
    }


def baseline(meta: dict, schema: dict, n: int) -> tuple[np.ndarray, str]:
    """What the candidate must beat without a champion: the train mean (in target units), or the train split's
    class frequencies as every row's probabilities."""
    if meta.get("task", "regression") == "regression":
        head, _ = servable(torch.nn.Identity(), meta)  # the mean of the (transformed) target, mapped back
        return np.full(n, float(head(torch.zeros(1)).item())), "the train-mean baseline"
    rows = np.asarray(schema["class_rows"]["train"], dtype=np.float64)
    return np.tile(rows / rows.sum(), (n, 1)), "the class-prior baseline"


def evaluate(s: Settings) -> dict:
    out, feat_dir = Path(s.evaluate.out_dir), Path(s.preprocess.out_dir)
    model, meta = load_model(Path(s.train.out_dir) / "model.pt")
    if not (feat_dir / "test").exists():
        raise UserError(f"evaluate: no test split in {feat_dir}; run the preprocess stage first")
    if meta.get("modality") == "image":  # the test shards (uint8 pixels: the model normalises them itself)
        from tasks.images.loader import test_split

        x, y = test_split(feat_dir)
    else:
        x, y = load_split(feat_dir / "test", meta["features"], meta["target"])
    raw = pd.read_parquet(feat_dir / "test_raw")  # the same rows, in the same order, as they came
    if len(raw) != len(y):
        raise UserError(
            f"evaluate: {feat_dir}/test_raw has {len(raw):,} rows but test has {len(y):,}; rerun the preprocess stage"
        )
    schema = json.loads((feat_dir / "schema.json").read_text())
    transform = json.loads((feat_dir / "transform.json").read_text())
    predicted, actual = predict(model, meta, x), y.double().numpy()
    metrics = task_metrics(actual, predicted, s.dataset.target_transform)
    slices = slice_metrics(raw, actual, predicted, s)
    base, base_name = baseline(meta, schema, len(actual))
    candidate = identity(
        {"data": {"dataset": s.dataset.name}, "target": meta["target"], "transform": transform, "split": split_of(s)}
    )
    champion = score_champion(s, raw, candidate)
    if champion is None:
        ref, ref_slices, against = task_metrics(actual, base, s.dataset.target_transform), None, base_name
    else:
        ref = task_metrics(actual, champion["predicted"], s.dataset.target_transform)
        ref_slices, against = slice_metrics(raw, actual, champion["predicted"], s), f"champion {champion['path']}"
    gate = decide(s.evaluate, metrics, ref, against, slices, ref_slices)
    gate["champion"] = None if champion is None else {k: champion[k] for k in ("path", "manifest_sha256", "created")}
    gate["compared"] = {
        "baseline": task_metrics(actual, base, s.dataset.target_transform),
        "champion": ref if champion is not None else None,
    }
    write_outputs(out, s, meta, actual, predicted, metrics, slices, ref_slices, gate, images=x if x.dim() == 4 else None)
    print(gate["message"])
    return dict(metrics, promote=int(gate["decision"] == "promote"), improvement=round(gate["improvement"], 6))


def write_outputs(out: Path, s: Settings, meta: dict, actual, predicted, metrics, slices, ref_slices, gate, images=None) -> None:
    """The files of the module docstring, each written atomically; metrics.json last."""
    from tasks.figures import figures

    classes = meta.get("classes")
    with atomic_path(out / "predictions.csv") as tmp:
        predictions_frame(actual, predicted, meta).to_csv(tmp, index=False, float_format="%.9g")
    if classes:
        residuals = 1 - predicted[np.arange(len(actual)), actual.astype(np.int64)]
    else:
        residuals = predicted - actual
    counts, edges = np.histogram(residuals, bins=50) if len(residuals) else (np.zeros(0), np.zeros(1))
    with atomic_path(out / "residuals.csv") as tmp:  # bins as [residual, residual_to): the histogram plot template
        pd.DataFrame({"residual": edges[:-1], "residual_to": edges[1:], "rows": counts}).to_csv(
            tmp, index=False, float_format="%.6g"
        )
    figures(out / "figures", actual, predicted, meta, metrics, Path(s.train.out_dir) / "summary.json", images)
    per_class = None
    if classes:
        reports = class_report(actual.astype(np.int64), predicted.argmax(1), len(classes))
        per_class = {str(c): r for c, r in zip(classes, reports)}
    write_json(
        out / "slices.json", {"primary": s.evaluate.primary, "candidate": slices, "champion": ref_slices, "classes": per_class}
    )
    write_json(out / "gate.json", gate)
    # the DVC metric: the figures a person compares across runs (the details are in gate.json and slices.json)
    figures_ = dict(metrics, promote=int(gate["decision"] == "promote"), improvement=round(gate["improvement"], 6))
    write_json(out / "metrics.json", figures_)


def predictions_frame(actual: np.ndarray, predicted: np.ndarray, meta: dict) -> pd.DataFrame:
    """actual and predicted (labels for classification, with one probability column p_<label> per class)."""
    classes = meta.get("classes")
    if not classes:
        return pd.DataFrame({"actual": actual, "predicted": predicted})
    names = np.asarray(classes, dtype=object)
    frame = pd.DataFrame({"actual": names[actual.astype(np.int64)], "predicted": names[predicted.argmax(1)]})
    return pd.concat([frame, pd.DataFrame(predicted, columns=[f"p_{c}" for c in classes])], axis=1)


if __name__ == "__main__":
    cli(evaluate)
