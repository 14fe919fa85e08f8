"""The evaluate stage's PNG figures (evaluate.out_dir/figures/): predicted vs actual and residuals for a number,
the confusion matrix and the calibration curve for labels (and for images a grid of misclassified test images),
the learning curves for all."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tasks.files import MARKER, MARKER_TEXT, atomic_path
from tasks.metrics import confusion_matrix, reliability

TASK_FIGURES = {"regression": ("pred_vs_actual.png", "residuals.png"), "classification": ("confusion.png", "calibration.png")}
IMAGE_FIGURES = ("misclassified.png",)
MAX_CONFUSION_LABELS = 30  # more classes: the matrix is drawn without tick labels
GRID = 6  # the misclassified images: a GRID × GRID grid


def figures(out: Path, actual: np.ndarray, predicted: np.ndarray, meta: dict, metrics: dict, summary: Path, images=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    # a plain directory of PNGs, each renamed into place (`dvc plots show` renders every file in it: no marker
    # file here), and the figures of another task (or of images) removed
    out.mkdir(parents=True, exist_ok=True)
    grid = images is not None and bool(meta.get("classes"))
    if meta.get("classes"):
        confusion(out, actual.astype(np.int64), predicted, meta["classes"], metrics)
        calibration(out, actual.astype(np.int64), predicted, metrics)
        if grid:
            misclassified(out, images, actual.astype(np.int64), predicted, meta["classes"])
    else:
        scatter(out, actual, predicted, meta["target"], metrics)
        residuals(out, actual, predicted, meta["target"])
    learning_curve(out, summary, "log-loss" if meta.get("classes") else "MSE (standardised target)")
    mine = {*TASK_FIGURES["classification" if meta.get("classes") else "regression"], "learning_curve.png"}
    mine |= set(IMAGE_FIGURES) if grid else set()
    for name in {n for names in TASK_FIGURES.values() for n in names}.union(IMAGE_FIGURES) - mine:
        (out / name).unlink(missing_ok=True)
    marker = out / MARKER  # (written there by an earlier version)
    if marker.exists() and marker.read_text() == MARKER_TEXT:
        marker.unlink()


def save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def scatter(out: Path, actual, predicted, target: str, metrics: dict) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.scatter(actual, predicted, s=3, alpha=0.3)
    if len(actual):
        lo, hi = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=1)
    r2 = "n/a" if metrics.get("r2") is None else f"{metrics['r2']:.3f}"
    ax.set(
        xlabel=f"actual {target}",
        ylabel=f"predicted {target}",
        title=f"test RMSE {metrics['rmse']:.4f}  R² {r2}  (n={metrics['n']:,})",
    )
    save(fig, out / "pred_vs_actual.png")


def residuals(out: Path, actual, predicted, target: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.hist(predicted - actual, bins=50)
    ax.axvline(0, color="black", linewidth=1)
    ax.set(xlabel=f"residual (predicted - actual {target})", ylabel="test rows", title="Residuals")
    save(fig, out / "residuals.png")


def confusion(out: Path, actual, probabilities, classes: list, metrics: dict) -> None:
    """Rows: the actual class, columns: the predicted one; each cell its rows, shaded by the share of its row."""
    import matplotlib.pyplot as plt

    k = len(classes)
    matrix = confusion_matrix(actual, probabilities.argmax(1), k)
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = min(12, max(5, 3 + 0.5 * k))
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if k <= MAX_CONFUSION_LABELS:
        names = [str(c)[:16] for c in classes]
        ax.set_xticks(range(k), names, rotation=45, ha="right")
        ax.set_yticks(range(k), names)
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{matrix[i, j]:,}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    ax.set(
        xlabel="predicted",
        ylabel="actual",
        title=f"test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['f1_macro']:.4f}\n(n={metrics['n']:,}; cells: rows)",
    )
    save(fig, out / "confusion.png")


def calibration(out: Path, actual, probabilities, metrics: dict) -> None:
    """Reliability: per confidence bin, the accuracy against the mean confidence (the diagonal is calibrated)."""
    import matplotlib.pyplot as plt

    bins = reliability(actual, probabilities)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot([0, 1], [0, 1], color="black", linewidth=1)
    if bins:
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="confidence (top probability)",
        ylabel="accuracy",
        title=f"Calibration: ECE {metrics['ece']:.4f}",
    )
    save(fig, out / "calibration.png")


def learning_curve(out: Path, summary: Path, loss: str) -> None:
    import matplotlib.pyplot as plt

    epochs = json.loads(summary.read_text()).get("epochs", []) if summary.exists() else []
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if epochs:
        ax.plot([e["epoch"] for e in epochs], [e["train_loss"] for e in epochs], label="train loss")
        ax.plot([e["epoch"] for e in epochs], [e["val_loss"] for e in epochs], label="validation loss")
        ax.set_yscale("log")
        ax.legend()
    ax.set(xlabel="epoch", ylabel=loss, title="Learning curves")
    save(fig, out / "learning_curve.png")


def misclassified(out: Path, images, actual: np.ndarray, probabilities: np.ndarray, classes: list) -> None:
    """The test images the model got wrong with the most confidence: each with its actual and predicted class and
    the probability it gave the wrong one."""
    import matplotlib.pyplot as plt

    predicted = probabilities.argmax(1)
    wrong = np.flatnonzero(predicted != actual)
    worst = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][: GRID * GRID]
    fig, axes = plt.subplots(GRID, GRID, figsize=(1.9 * GRID, 2.1 * GRID), dpi=100)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst):
        pixels = np.asarray(images[i]).transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        ax.imshow(
            pixels[:, :, 0] if pixels.shape[2] == 1 else pixels, cmap="gray" if pixels.shape[2] == 1 else None, vmin=0, vmax=255
        )
        ax.set_title(
            f"{str(classes[actual[i]])[:12]} → {str(classes[predicted[i]])[:12]}\n(p {probabilities[i, predicted[i]]:.2f})",
            fontsize=8,
        )
    fig.suptitle(f"Misclassified test images, most confident first ({len(wrong):,} of {len(actual):,}; actual → predicted)")
    save(fig, out / "misclassified.png")
