"""The shipped datasets (data/datasets/*.yaml) and switching params.yaml between datasets: `trainflow use NAME`
(python -m tasks.datasets use NAME) replaces params.yaml's `dataset:` section, picks an evaluate.primary metric
that scores the dataset's task when the current one does not, and switches the champion to the dataset's own
(tasks/champions.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from tasks.errors import UserError
from tasks.settings import PARAMS, PRIMARY, DatasetSettings, edit_params, load_settings, parse_settings

DATASETS = Path(__file__).resolve().parents[1] / "data" / "datasets"  # the shipped dataset sections
END_OF_DATASET = "# end of dataset"


# the model family a dataset of each modality gets from `use` when the current one does not take its data
# (with the training values measured for it: bench/images.py, bench/quality.py)
FAMILY = {
    "image": {"model": "cnn", "hidden": [32, 64], "epochs": 8, "batch_size": 256, "lr": 0.002, "schedule": "cosine"},
    "table": {"model": "mlp", "hidden": [256, 256, 256], "augment": "none", "epochs": 60, "batch_size": 512, "lr": 0.005}
    | {"schedule": "onecycle"},
}


def train_for(modality: str, train: dict) -> dict:
    """The train.* changes (dotted keys) that make the train section fit a dataset of this modality; {} if it does."""
    image_model = train.get("model") in ("cnn", "resnet")
    if image_model == (modality == "image") or ":" in str(train.get("model")):
        return {}
    return {f"train.{k}": v for k, v in FAMILY[modality].items()}


def use_dataset(name_or_path: str, params: str | Path = PARAMS) -> DatasetSettings:
    """Make a shipped dataset (data/datasets/NAME.yaml) or a dataset file the one params.yaml trains on:
    its `dataset:` section replaces params.yaml's, the rest of the file (and its comments) stays."""
    local = Path(params).resolve().parent / "data" / "datasets" / f"{name_or_path}.yaml"  # e.g. drafted by `dataset new`
    if Path(name_or_path).suffix in (".yaml", ".yml"):
        path = Path(name_or_path)
    else:
        path = local if local.exists() else DATASETS / f"{name_or_path}.yaml"
    if not path.exists():
        shipped = sorted(p.stem for p in DATASETS.glob("*.yaml"))
        raise UserError(f"dataset {name_or_path!r}: {path} does not exist; shipped datasets: {shipped}")
    block = path.read_text()
    block = block[block.index("dataset:") :] if "\ndataset:" in f"\n{block}" else ""
    section = (yaml.safe_load(block) or {}).get("dataset") if block else None
    if not isinstance(section, dict):
        raise UserError(f"{path}: expected a `dataset:` section (name, source, sha256, suite, task, target, key, columns)")
    text = Path(params).read_text()
    start, end = text.find("\ndataset:\n"), text.find(END_OF_DATASET)
    if start < 0 or end < 0:
        raise UserError(
            f"{params}: cannot find its `dataset:` section (ending with the line '{END_OF_DATASET}'); "
            f"paste the section of {path} there instead"
        )
    new = text[: start + 1] + block.rstrip("\n").split(END_OF_DATASET)[0].rstrip("\n") + "\n" + text[end:]
    primary = ((yaml.safe_load(new) or {}).get("evaluate") or {}).get("primary")
    task = section.get("task")
    if task in PRIMARY and primary not in PRIMARY[task]:  # the gate's metric must score this task
        new = edit_params(new, {"evaluate.primary": PRIMARY[task][0]})
        print(f"evaluate.primary: {primary} -> {PRIMARY[task][0]} (a {task} metric)", file=sys.stderr)
    changes = train_for(section.get("modality", "table"), (yaml.safe_load(new) or {}).get("train") or {})
    if changes:  # a model family of the dataset's modality (cnn for images, mlp for tables)
        new = edit_params(new, changes)
        print(
            f"{', '.join(f'{k}: {v}' for k, v in changes.items())} (a model of {section.get('modality', 'table')}s)",
            file=sys.stderr,
        )
    settings = parse_settings(yaml.safe_load(new), f"{path} in {params}", root=Path(params).resolve().parent)
    Path(params).write_text(new)
    return settings.dataset


def main(argv: list[str] | None = None) -> None:
    """python -m tasks.datasets use DATASET (the same as `trainflow use DATASET`)."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m tasks.datasets", description="Switch params.yaml to another dataset (and to its champion)."
    )
    sub = ap.add_subparsers(dest="command", required=True)
    use = sub.add_parser(
        "use", help="make a shipped dataset (data/datasets/NAME.yaml) or a dataset file the one params.yaml trains on"
    )
    use.add_argument("dataset", help="a name in data/datasets/ (california_housing, flights, ...) or a dataset YAML file")
    a = ap.parse_args(argv)
    from tasks.champions import dataset_key, switch_dataset
    from tasks.paths import champion_path

    try:
        before = load_settings()
        d = use_dataset(a.dataset)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    old, new = dataset_key(before.dataset.name, before.dataset.target), dataset_key(d.name, d.target)
    said = switch_dataset(champion_path(before.evaluate.champion), old, new)
    print(f"params.yaml now trains on {d.name} ({d.source}, target {d.target}, {d.task}); {said}. Run `dvc repro` or the flow")


if __name__ == "__main__":
    main()
