"""Score the trained model on the held-out test split and decide whether it replaces the champion.
Run: python -m tasks.evaluate

Writes to evaluate.out_dir:
- metrics.json: RMSE, MAE, R², MAPE in target units (a DVC metric: `dvc metrics diff`), and the
  champion's and the train-mean baseline's on the same rows;
- slices.json: the same metrics per slice (each category, or quantile bin, of the dataset.slices columns);
- gate.json: the champion/challenger decision (promote or keep), with the metric and the margin;
- predictions.csv (actual vs predicted), residuals.csv (their histogram): DVC plots (`dvc plots diff`);
- pred_vs_actual.png, residuals.png, learning_curve.png.

The gate: the champion is the promoted package (evaluate.champion), scored here by its own transform and
model on the raw test rows. The candidate must beat it by evaluate.min_improvement on evaluate.primary, and
no slice of at least MIN_SLICE_ROWS rows may get worse by more than evaluate.max_slice_regression. With no
champion, the candidate must beat predicting the train mean. A champion that fails its checks (altered,
incomplete, unreadable) stops the run: the gate never promotes over a model it cannot score. The promote
stage (tasks/promote.py) acts on the decision.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tasks.errors import UserError
from tasks.files import atomic_path, sha256_file, write_json
from tasks.metrics import NAMES, compared, improvement, regression_metrics
from tasks.paths import champion_path
from tasks.settings import Settings, cli
from tasks.training.data import EVAL_CHUNK, load_split
from tasks.training.model import load_model

MIN_SLICE_ROWS = 30  # smaller slices are reported but not gated: their metrics are mostly noise
TOP_CATEGORIES = 20
ROUNDING = 1e-6  # a smaller relative difference is float rounding (the same model scored by torch and by ONNX)


def predict(model: torch.nn.Module, meta: dict, x: torch.Tensor) -> np.ndarray:
    """Model inputs -> predictions in target units."""
    with torch.no_grad():
        scaled = torch.cat([model(c) for c in x.split(EVAL_CHUNK)]) if len(x) else torch.empty(0)
    return (scaled.double() * meta["target_std"] + meta["target_mean"]).numpy()


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
    for col in s.dataset.slices:
        labels = slice_labels(raw[col], s.dataset.columns[col], s.evaluate.slice_bins).to_numpy()
        out[col] = {str(lab): regression_metrics(actual[labels == lab], predicted[labels == lab]) for lab in pd.unique(labels)}
    return out


def score_champion(s: Settings, raw: pd.DataFrame, actual: np.ndarray) -> dict | None:
    """The champion package's metrics and slices on the same test rows; None when there is no champion."""
    from tasks.modelpackage import ModelPackage, verified_champion

    path = champion_path(s.evaluate.champion)
    if not path.exists() and not path.is_symlink():
        return None
    try:
        champion = ModelPackage(*verified_champion(path))
        predicted = champion.predict(raw)
    except UserError as e:
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


def evaluate(s: Settings) -> dict:
    out, feat_dir = Path(s.evaluate.out_dir), Path(s.preprocess.out_dir)
    model, meta = load_model(Path(s.train.out_dir) / "model.pt")
    if not (feat_dir / "test").exists():
        raise UserError(f"evaluate: no test split in {feat_dir}; run the preprocess stage first")
    x, y = load_split(feat_dir / "test", meta["features"], meta["target"])
    raw = pd.read_parquet(feat_dir / "test_raw")  # the same rows, in the same order, as they came
    if len(raw) != len(y):
        raise UserError(
            f"evaluate: {feat_dir}/test_raw has {len(raw):,} rows but test has {len(y):,}; rerun the preprocess stage"
        )
    predicted, actual = predict(model, meta, x), y.double().numpy()
    metrics = regression_metrics(actual, predicted)
    slices = slice_metrics(raw, actual, predicted, s)

    baseline = np.full(len(actual), meta["target_mean"])  # predicting the train mean
    champion = score_champion(s, raw, actual)
    if champion is None:
        ref, ref_slices, against = regression_metrics(actual, baseline), None, "the train-mean baseline"
    else:
        ref, ref_slices, against = (
            regression_metrics(actual, champion["predicted"]),
            slice_metrics(raw, actual, champion["predicted"], s),
            f"champion {champion['path']}",
        )
    gate = decide(s.evaluate, metrics, ref, against, slices, ref_slices)
    gate["champion"] = None if champion is None else {k: champion[k] for k in ("path", "manifest_sha256", "created")}
    gate["compared"] = {"baseline": regression_metrics(actual, baseline), "champion": ref if champion is not None else None}

    # the DVC metric: the figures a person compares across runs (the details are in gate.json and slices.json)
    figures = dict(metrics, promote=int(gate["decision"] == "promote"), improvement=round(gate["improvement"], 6))
    with atomic_path(out / "predictions.csv") as tmp:
        pd.DataFrame({"actual": actual, "predicted": predicted}).to_csv(tmp, index=False, float_format="%.9g")
    residuals = predicted - actual
    counts, edges = np.histogram(residuals, bins=50) if len(residuals) else (np.zeros(0), np.zeros(1))
    with atomic_path(out / "residuals.csv") as tmp:  # bins as [residual, residual_to): the histogram plot template
        pd.DataFrame({"residual": edges[:-1], "residual_to": edges[1:], "rows": counts}).to_csv(
            tmp, index=False, float_format="%.6g"
        )
    plots(actual, predicted, meta["target"], metrics, Path(s.train.out_dir) / "summary.json", out)
    write_json(out / "slices.json", {"primary": s.evaluate.primary, "candidate": slices, "champion": ref_slices})
    write_json(out / "gate.json", gate)
    write_json(out / "metrics.json", figures)
    print(gate["message"])
    return figures


def plots(actual: np.ndarray, predicted: np.ndarray, target: str, metrics: dict, summary: Path, out: Path) -> None:
    """Predicted vs actual, the residual histogram and the learning curves, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name: str) -> None:
        fig.tight_layout()
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(actual, predicted, s=3, alpha=0.3)
    if len(actual):
        lo, hi = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=1)
    ax.set(
        xlabel=f"actual {target}",
        ylabel=f"predicted {target}",
        title=f"test RMSE {metrics['rmse']:.4f}  R² {metrics['r2']:.3f}  (n={metrics['n']:,})",
    )
    save(fig, "pred_vs_actual.png")

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.hist(predicted - actual, bins=50)
    ax.axvline(0, color="black", linewidth=1)
    ax.set(xlabel=f"residual (predicted - actual {target})", ylabel="test rows", title="Residuals")
    save(fig, "residuals.png")

    epochs = json.loads(summary.read_text()).get("epochs", []) if summary.exists() else []
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if epochs:
        ax.plot([e["epoch"] for e in epochs], [e["train_loss"] for e in epochs], label="train loss")
        ax.plot([e["epoch"] for e in epochs], [e["val_loss"] for e in epochs], label="validation loss")
        ax.set_yscale("log")
        ax.legend()
    ax.set(xlabel="epoch", ylabel="MSE (standardised target)", title="Learning curves")
    save(fig, "learning_curve.png")


if __name__ == "__main__":
    cli(evaluate)
