"""The package's model card (MODEL_CARD.md): what the model predicts, from what data, how well (overall, per
slice, against what it was compared with), its limits, and how it was trained."""

from __future__ import annotations

from tasks.metrics import LOWER_IS_BETTER, NAMES, shown

MIN_SLICE_ROWS = 30


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def model_card(m: dict, slices: dict, compared: dict, s) -> str:
    parts = [
        header(m, s),
        data(m),
        metrics(m["metrics"], compared),
        by_slice(slices),
        limitations(slices),
        training(m, s),
        lineage(m),
    ]
    return "\n\n".join(parts) + "\n"


def header(m: dict, s) -> str:
    git = f"git {str(m['git']['commit'])[:12]}{', uncommitted changes' if m['git']['dirty'] else ''}"
    if m.get("modality") == "image":
        image = s.dataset.image
        return (
            f"# Model card: {m['target']} on {m['data']['dataset']}\n\n"
            f"Built {m['created']} by Trainflow {m['trainflow_version']} "
            f"({git}; Prefect flow run {m['prefect_flow_run_id'] or 'none'}).\n\n"
            f"## Intended use\nClassifies images ({what(m, s)}) like the training images: decoded, converted to "
            f"{image.channels} channel(s) and resized to {image.size[0]}×{image.size[1]}; `suite.yaml` says which formats, sizes "
            "and channels it accepts. Batch inference: `trainflow predict PACKAGE DIRECTORY|TABLE OUTPUT` rejects images "
            "that do not decode or break the suite, with reasons. The ONNX model takes uint8 pixels (N, C, H, W) and "
            "normalises them itself."
        )
    return (
        f"# Model card: {m['target']} on {m['data']['dataset']}\n\n"
        f"Built {m['created']} by Trainflow {m['trainflow_version']} "
        f"({git}; Prefect flow run {m['prefect_flow_run_id'] or 'none'}).\n\n"
        f"## Intended use\nPredicts `{m['target']}` ({what(m, s)}) for rows shaped like the training data: the columns of "
        "`suite.yaml` without the target, each within the ranges the suite allows. Batch inference: `trainflow predict "
        "PACKAGE INPUT OUTPUT` validates every row with the suite first and writes rejected rows apart, with reasons."
    )


def what(m: dict, s) -> str:
    """The task in words: 'regression', 'regression, trained on log(target)', 'binary: <=50K, >50K'."""
    classes = m.get("classes")
    if classes:
        return f"{s.dataset.task}: {', '.join(map(str, classes[:10]))}{' …' if len(classes) > 10 else ''}"
    transform = m.get("target_transform", "none")
    return "regression" + (f", trained on {transform}(target), predicted in the target's units" if transform != "none" else "")


def data(m: dict) -> str:
    rows = m["data"]["rows"]
    key = (m.get("split") or {}).get("key") or m["key"] or "the whole row"
    return (
        f"## Data\n`{m['data']['source']}` (sha256 `{m['data']['raw']['sha256']}`), split by a hash of "
        f"{key}: {rows['train']:,} train, {rows['val']:,} validation, {rows['test']:,} test rows."
    )


def metrics(met: dict, compared: dict) -> str:
    names = [k for k in NAMES if k in met]
    lines = [
        "## Metrics (held-out test split)",
        "",
        "| | " + " | ".join(NAMES[k] for k in names) + " | rows |",
        "|---" * (len(names) + 2) + "|",
        "| this model | " + " | ".join(fmt(met.get(k)) for k in names) + f" | {met['n']:,} |",
    ]
    labels = {"champion": "the champion it was compared with", "baseline": "the baseline (train mean, or class prior)"}
    for name, label in labels.items():
        other = compared.get(name)
        if isinstance(other, dict):
            lines.append(f"| {label} | " + " | ".join(fmt(other.get(k)) for k in names) + f" | {other['n']:,} |")
    return "\n".join(lines)


def by_slice(slices: dict) -> str:
    primary = slices.get("primary") or "rmse"
    parts = []
    for col, by in (slices.get("candidate") or {}).items():
        names = list(dict.fromkeys([primary] + shown(next(iter(by.values()), {}))))[:3]
        head = "| slice | rows | " + " | ".join(NAMES[k] for k in names) + " |\n|---|---|" + "---|" * len(names)
        rows = [f"| {k} | {v['n']:,} | " + " | ".join(fmt(v.get(n)) for n in names) + " |" for k, v in sorted(by.items())]
        parts.append(f"### By {col}\n\n{head}\n" + "\n".join(rows))
    per_class = slices.get("classes")
    if per_class:
        rows = [
            f"| {c} | {r['support']:,} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} |" for c, r in per_class.items()
        ]
        parts.append("### By class\n\n| class | test rows | precision | recall | F1 |\n|---|---|---|---|---|\n" + "\n".join(rows))
    return "\n\n".join(parts) if parts else "(no slices configured: dataset.slices)"


def limitations(slices: dict) -> str:
    primary = slices.get("primary") or "rmse"
    scored = [
        (v[primary] if LOWER_IS_BETTER[primary] else -v[primary], f"{c}={k}", v[primary])
        for c, by in (slices.get("candidate") or {}).items()
        for k, v in by.items()
        if v.get(primary) is not None and v["n"] >= MIN_SLICE_ROWS
    ]
    worst = sorted(scored, reverse=True)[:3]
    lines = [
        "## Limitations",
        "- Trained on the data above only: inputs outside the suite's ranges are rejected, not extrapolated.",
        "- Categories not seen in training (or rarer than preprocess.min_frequency) share one out-of-vocabulary code.",
        "- Missing numeric values are imputed with the train mean (with a missing indicator when train had any).",
    ]
    if worst:
        lines.append(f"- Weakest slices (test {NAMES[primary]}): " + ", ".join(f"{name} {v:.4f}" for _, name, v in worst) + ".")
    return "\n".join(lines)


def training(m: dict, s) -> str:
    p, tr = s.train, m["training"]
    return (
        f"## Training\n{p.model} (hidden {list(p.hidden)}, dropout {p.dropout}), AdamW lr {p.lr}, weight decay {p.weight_decay}, "
        f"batch {p.batch_size}, {tr['epochs_run']} epochs (best {tr['best_epoch']}, early stopping patience {p.patience}), "
        f"{tr['world_size']} rank(s) on {tr['device']} ({tr.get('launcher', 'local')}, {tr.get('strategy', 'ddp')}, "
        f"{tr.get('precision', 'fp32')}); training took {tr['seconds']:.1f} s ({tr['samples_per_s']:,.0f} samples/s).\n\n"
        "Files: `model.onnx` (ONNX, onnxruntime), `transform.json` (the fitted feature transform), `suite.yaml` "
        "(input expectations), `manifest.json` (lineage, params, metrics, sha256 of every file)."
    )


def lineage(m: dict) -> str:
    """The parent a warm-started model came from (train.init_from), or that it has none."""
    p = m.get("parent")
    if not p:
        return "## Lineage\nTrained from scratch (train.init_from: null)."
    if p["kind"] == "checkpoint":
        source = f"the checkpoint `{p['path']}` (sha256 `{p['sha256']}`)"
    else:
        source = (
            f"the package `{p['path']}` (manifest sha256 `{p['package_sha256']}`; built {p['created']} from git "
            f"{str(p['git_commit'])[:12]}, Prefect flow run {p['prefect_flow_run_id'] or 'none'}; {p['rows']['train']:,} "
            f"train rows of {p['dataset']})"
        )
    fresh = ", ".join(p["reinitialised"]) or "none"
    transform = "its feature transform reused" if p["init_transform"] == "reuse" else "the feature transform refitted"
    return (
        f"## Lineage\nWarm-started from {source}, {transform}: {len(p['kept'])} layer(s) loaded, tensors "
        f"reinitialised: {fresh}. Only the weights carried over; the gate compared this model as any other."
    )
