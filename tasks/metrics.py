"""Model quality figures: pure numpy, shared by evaluation, the gate, the package card and the run summary."""

from __future__ import annotations

import numpy as np

LOWER_IS_BETTER = {"rmse": True, "mae": True, "mape": True, "r2": False}
NAMES = {"rmse": "RMSE", "mae": "MAE", "r2": "R²", "mape": "MAPE"}


def regression_metrics(actual: np.ndarray, predicted: np.ndarray) -> dict:
    err = predicted - actual
    nonzero = np.abs(actual) > 1e-12
    spread = np.sum((actual - actual.mean()) ** 2) if len(actual) else 0.0
    return {  # None where a metric is undefined (no rows; R² of a constant target; MAPE with every actual 0)
        "rmse": float(np.sqrt(np.mean(err**2))) if len(err) else None,
        "mae": float(np.mean(np.abs(err))) if len(err) else None,
        "r2": float(1 - np.sum(err**2) / spread) if spread > 0 else None,
        "mape": float(np.mean(np.abs(err[nonzero] / actual[nonzero]))) if nonzero.any() else None,  # rows with actual 0 left out
        "n": int(len(actual)),
    }


def improvement(metric: str, new: float, old: float) -> float:
    """Relative improvement of `new` over `old` (positive: better), whichever way the metric points."""
    if not old:
        return float("inf")
    return ((old - new) if LOWER_IS_BETTER[metric] else (new - old)) / abs(old)


def compared(metric: str, new: float, old: float | None) -> str:
    """'3.20% better', '11.85% worse' or 'no better': the change in words, whichever way the metric points."""
    if old is None:
        return "nothing to compare with"
    gain = improvement(metric, new, old)
    if abs(gain) < 5e-5:
        return "no better"
    return f"{abs(gain):.2%} {'better' if gain > 0 else 'worse'}"
