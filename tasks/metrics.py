"""Model quality figures: pure numpy, shared by evaluation, the gate, the package card and the run summary.

Regression: RMSE, MAE, R², MAPE in the target's units (and RMSE in the transformed units when the target is
trained log-transformed). Classification, from each row's class probabilities: accuracy, balanced accuracy,
macro-F1, log-loss, ROC-AUC (binary; multiclass: the macro average of one-vs-rest), expected calibration error
(15 equal-width bins of the top probability), and per class precision, recall, F1 and support.
"""

from __future__ import annotations

import numpy as np

LOWER_IS_BETTER = {
    "rmse": True,
    "mae": True,
    "mape": True,
    "r2": False,
    "rmse_transformed": True,
    "accuracy": False,
    "balanced_accuracy": False,
    "f1_macro": False,
    "log_loss": True,
    "roc_auc": False,
    "ece": True,
}
NAMES = {
    "rmse": "RMSE",
    "mae": "MAE",
    "r2": "R²",
    "mape": "MAPE",
    "rmse_transformed": "RMSE (transformed target)",
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "f1_macro": "macro-F1",
    "log_loss": "log-loss",
    "roc_auc": "ROC-AUC",
    "ece": "ECE",
}
SHOWN = {  # the figures a run summary shows, per task
    "regression": ["rmse", "mae", "r2", "mape"],
    "classification": ["accuracy", "balanced_accuracy", "f1_macro", "log_loss", "roc_auc", "ece"],
}
VAL_METRICS = {"val_rmse": "val RMSE", "val_accuracy": "val accuracy"}  # the per-epoch validation metric in words
ECE_BINS = 15
P_MIN = 1e-15  # probabilities are clipped to [P_MIN, 1 - P_MIN] in the log-loss, as scikit-learn does


def val_metric(record: dict) -> str:
    """An epoch's validation metric in words: 'val RMSE 0.5123' or 'val accuracy 0.8510'."""
    return next((f"{words} {record[k]:.4f}" for k, words in VAL_METRICS.items() if record.get(k) is not None), "")


def shown(metrics: dict) -> list[str]:
    """The headline metrics present in `metrics`, in display order."""
    task = "regression" if "rmse" in metrics else "classification"
    return [k for k in SHOWN[task] if metrics.get(k) is not None]


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


def task_metrics(actual: np.ndarray, predicted: np.ndarray, transform: str = "none") -> dict:
    """Regression metrics (predicted: values) or classification metrics (predicted: an (n, K) matrix of class
    probabilities, actual: class indices); a transformed regression target adds rmse_transformed."""
    if predicted.ndim == 2:
        return classification_metrics(actual.astype(np.int64), predicted)
    out = regression_metrics(actual, predicted)
    if transform != "none":
        forward = {"log": np.log, "log1p": np.log1p}[transform]
        with np.errstate(invalid="ignore", divide="ignore"):
            err = forward(np.maximum(predicted, -1 + 1e-12 if transform == "log1p" else 1e-12)) - forward(actual)
        out["rmse_transformed"] = float(np.sqrt(np.mean(err**2))) if len(err) else None
    return out


def classification_metrics(actual: np.ndarray, probabilities: np.ndarray) -> dict:
    """Headline classification metrics of class indices `actual` under `probabilities` (n, K)."""
    n, k = probabilities.shape
    if not n:
        return {m: None for m in SHOWN["classification"]} | {"n": 0}
    predicted = probabilities.argmax(1)
    per_class = class_report(actual, predicted, k)
    recalls = [c["recall"] for c in per_class if c["support"]]
    p_true = np.clip(probabilities[np.arange(n), actual], P_MIN, 1 - P_MIN)
    return {
        "accuracy": float(np.mean(predicted == actual)),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "f1_macro": float(np.mean([c["f1"] for c in per_class])),
        "log_loss": float(-np.mean(np.log(p_true))),
        "roc_auc": roc_auc(actual, probabilities),
        "ece": calibration_error(actual, probabilities),
        "n": int(n),
    }


def class_report(actual: np.ndarray, predicted: np.ndarray, k: int) -> list[dict]:
    """Per class: precision, recall, F1 (0 where undefined, as scikit-learn's zero_division=0) and support."""
    confusion = confusion_matrix(actual, predicted, k)
    out = []
    for c in range(k):
        tp, predicted_c, support = confusion[c, c], confusion[:, c].sum(), confusion[c, :].sum()
        precision = tp / predicted_c if predicted_c else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append({"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(support)})
    return out


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """Rows: the actual class; columns: the predicted one."""
    return np.bincount(actual * k + predicted, minlength=k * k).reshape(k, k)


def _auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """The area under the ROC curve: the chance a positive outscores a negative (ties count half)."""
    n_pos, n_neg = int(positive.sum()), int(len(positive) - positive.sum())
    if not n_pos or not n_neg:
        return None
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    # average ranks of ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(score)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(actual: np.ndarray, probabilities: np.ndarray) -> float | None:
    """Binary: of the positive class's probability; multiclass: the mean of one-vs-rest AUCs (classes present)."""
    k = probabilities.shape[1]
    if k == 2:
        return _auc(actual == 1, probabilities[:, 1])
    aucs = [a for c in range(k) if (a := _auc(actual == c, probabilities[:, c])) is not None]
    return float(np.mean(aucs)) if aucs else None


def calibration_error(actual: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the row-weighted mean gap between confidence (the top probability) and
    accuracy, over equal-width confidence bins."""
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == actual
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    rows = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, confidence, bins) - np.bincount(which, correct.astype(float), bins))
    return float(gap.sum() / max(rows.sum(), 1))


def reliability(actual: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin: mean confidence, accuracy and rows (the calibration plot)."""
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == actual
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        if mask.any():
            out.append(
                {"confidence": float(confidence[mask].mean()), "accuracy": float(correct[mask].mean()), "rows": int(mask.sum())}
            )
    return out


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
