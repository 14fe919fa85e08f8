"""Reference statistics of accepted data, and drift of new data against them (used by the validate stage).

Numeric columns: count, null rate, mean, std, deciles, and bins: the distinct interior deciles as edges and
the reference's own fraction of rows in each bin (bins are closed on the right: a value equal to an edge
falls in the bin below it, for the reference and new data alike). Drift is the mean shift in units of the
reference std and the population stability index (PSI) of new data over those bins against those
fractions; tied or low-cardinality columns, whose deciles coincide, get as many bins as they have distinct
edges. A reference written before bins were stored (quantiles only) is compared by the mean shift alone:
its PSI is not computed (the report names the columns), as guessing 10% per decile is what gave tied
columns a PSI of 0.3-0.75 against themselves. Categorical columns: category frequencies; drift is a new or
a vanished category. Timestamp columns: count, null rate, first and last (ISO 8601); not compared, as time
moves on by nature (the suite's min and max bound them).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DECILES = np.linspace(0, 1, 11)
EPS = 1e-4  # floor of a bin's share in the PSI, so an empty bin counts as a large (not infinite) shift
TOP = 1000  # categories kept per column


def column_stat(col: pd.Series) -> dict:
    s: dict = {"count": int(col.notna().sum()), "null_rate": float(col.isna().mean()) if len(col) else 0.0}
    if col.dtype.kind == "M":
        if s["count"]:
            s.update(first=col.min().isoformat(), last=col.max().isoformat())
    elif pd.api.types.is_numeric_dtype(col):
        x = _finite(col)
        if len(x):
            quantiles = np.quantile(np.sort(x), DECILES)  # the same values; sorting first takes half the time
            edges = np.unique(quantiles[1:-1])
            s.update(
                mean=float(x.mean()),
                std=float(x.std()),
                quantiles=quantiles.tolist(),
                bins={"edges": edges.tolist(), "fractions": fractions(edges, x).tolist()},
            )
    else:
        freq = col.dropna().astype(str).value_counts(normalize=True).head(TOP)
        s["categories"] = {k: round(float(v), 6) for k, v in freq.items()}
    return s


def column_stats(frame: pd.DataFrame) -> dict:
    return {name: column_stat(col) for name, col in frame.items()}


def _finite(col: pd.Series) -> np.ndarray:
    """The finite values as float64, without a copy when they all are (columns of 10M rows and more)."""
    x = col.to_numpy(dtype=np.float64, na_value=np.nan)
    finite = np.isfinite(x)
    return x if finite.all() else x[finite]


def fractions(edges: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The fraction of x in each bin (-inf, e0], (e0, e1], ..., (e_last, inf). (A count of x ≤ e per edge: a
    vectorised comparison is several times faster than a binary search per value for the few edges here.)"""
    at_most = [np.count_nonzero(x <= e) for e in edges]
    return np.diff([0, *at_most, len(x)]) / max(len(x), 1)


def psi(bins: dict, x: np.ndarray) -> float:
    """PSI of x over the reference's bins, against the reference's fraction of rows in each."""
    edges = np.asarray(bins["edges"], dtype=np.float64)
    e = np.maximum(np.asarray(bins["fractions"], dtype=np.float64), EPS)
    a = np.maximum(fractions(edges, x), EPS)
    return float(np.sum((a - e) * np.log(a / e)))


def psi_unchecked(reference: dict) -> list[str]:
    """Numeric columns of a reference written before bins were stored: their PSI is not computed."""
    return [name for name, ref in reference.items() if "quantiles" in ref and "bins" not in ref]


def column_drift(ref: dict, col: pd.Series, max_mean_shift: float, max_psi: float) -> dict | None:
    """The findings for one column when it drifted beyond the bounds, else None."""
    if col.dtype.kind == "M":
        return None  # timestamps: see the module's docstring
    if "quantiles" in ref and pd.api.types.is_numeric_dtype(col):
        x = _finite(col)
        if not len(x):
            return None
        shift = abs(float(x.mean()) - ref["mean"]) / (ref["std"] or 1.0)
        index = psi(ref["bins"], x) if "bins" in ref else None
        if shift > max_mean_shift or (index is not None and index > max_psi):
            return {"mean_shift_std": round(shift, 4), "psi": None if index is None else round(index, 4)}
    elif "categories" in ref:
        seen = set(col.dropna().astype(str).unique())
        new, gone = sorted(seen - set(ref["categories"])), sorted(set(ref["categories"]) - seen)
        if new or gone:
            return {"new_categories": new[:20], "vanished_categories": gone[:20]}
    return None


def compare(reference: dict, frame: pd.DataFrame, max_mean_shift: float, max_psi: float) -> dict:
    """{column: findings} for every column that drifted beyond the bounds."""
    found = {name: column_drift(ref, frame[name], max_mean_shift, max_psi) for name, ref in reference.items() if name in frame}
    return {name: d for name, d in found.items() if d}


def describe(name: str, d: dict, max_mean_shift: float, max_psi: float) -> str:
    if "psi" in d:
        index = "PSI not computed (a reference without bins)" if d["psi"] is None else f"PSI {d['psi']:.3f} (max {max_psi})"
        return f"  - column {name}: mean moved {d['mean_shift_std']:.2f} std (max {max_mean_shift}), {index}"
    return f"  - column {name}: new categories {d['new_categories']}, vanished {d['vanished_categories']}"
