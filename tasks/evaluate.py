"""Score the trained model on the held-out test split.  Run: python -m tasks.evaluate

Writes metrics.json (RMSE, MAE, R² in target units; a DVC metric), predictions.csv (actual vs
predicted; a DVC plot) and pred_vs_actual.png.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tasks.files import atomic_path, write_json
from tasks.model import load_model
from tasks.settings import Settings, UserError, cli
from tasks.train import EVAL_CHUNK, load_split


def regression_metrics(actual: np.ndarray, predicted: np.ndarray) -> dict:
    err = predicted - actual
    return {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "r2": float(1 - np.sum(err**2) / np.sum((actual - actual.mean()) ** 2)),
        "n": int(len(actual)),
    }


def predict(model: torch.nn.Module, meta: dict, x: torch.Tensor) -> np.ndarray:
    """Model inputs -> predictions in target units."""
    with torch.no_grad():
        scaled = torch.cat([model(c) for c in x.split(EVAL_CHUNK)]) if len(x) else torch.empty(0)
    return (scaled.double() * meta["target_std"] + meta["target_mean"]).numpy()


def plot(actual: np.ndarray, predicted: np.ndarray, target: str, metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(actual, predicted, s=3, alpha=0.3)
    lo, hi = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=1)
    ax.set(xlabel=f"actual {target}", ylabel=f"predicted {target}",
           title=f"test RMSE {metrics['rmse']:.4f}  R² {metrics['r2']:.3f}  (n={metrics['n']:,})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def evaluate(s: Settings) -> dict:
    out, feat_dir = Path(s.evaluate.out_dir), Path(s.preprocess.out_dir)
    model, meta = load_model(Path(s.train.out_dir) / "model.pt")
    if not (feat_dir / "test").exists():
        raise UserError(f"evaluate: no test split in {feat_dir}; run the preprocess stage first")
    x, y = load_split(feat_dir / "test", meta["features"], meta["target"])
    predicted = predict(model, meta, x)
    actual = y.double().numpy()
    metrics = regression_metrics(actual, predicted)
    with atomic_path(out / "predictions.csv") as tmp:
        pd.DataFrame({"actual": actual, "predicted": predicted}).to_csv(tmp, index=False, float_format="%.9g")
    plot(actual, predicted, meta["target"], metrics, out / "pred_vs_actual.png")
    write_json(out / "metrics.json", metrics)
    return metrics


if __name__ == "__main__":
    cli(evaluate)
