"""The reference file (validate.reference): the statistics of the last accepted data of each dataset.

    {"datasets": {"<dataset.name>/<dataset.target>": {"data_sha256": ..., "rows": ..., "columns": {...}}, ...}}

Each dataset is compared only with its own entry, so switching datasets (`trainflow use`) never compares
one dataset's data with another's columns, and switching back compares with the last accepted data of that
dataset. A run writes its own entry and keeps the others (read again just before writing, replaced
atomically). A file of the old layout (one dataset: {"data_sha256", "rows", "columns"}) is read as the entry
of the current dataset when it has exactly the suite's columns, else ignored (it cannot be told whose it
is); the next write replaces it with the keyed layout.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.errors import UserError
from tasks.files import write_json


def dataset_key(name: str, target: str) -> str:
    return f"{name}/{target}"


def _load(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        found = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(
            f"validate.reference: {path} is not readable JSON ({e}); delete it (the next accepted run writes a new one)"
        ) from None
    if not isinstance(found, dict) or not isinstance(found.get("datasets", found.get("columns")), dict):
        raise UserError(
            f"validate.reference: {path} holds neither 'datasets' nor 'columns'; delete it "
            "(the next accepted run writes a new one)"
        )
    return found


def read_reference(path: str | Path, key: str, columns: list[str]) -> tuple[dict | None, str]:
    """This dataset's reference columns (None when there is none) and, when None, why."""
    path = Path(path)
    found = _load(path)
    if found is None:
        return None, f"no reference yet ({path} is written from this run's data, the first accepted)"
    if "datasets" in found:
        entry = found["datasets"].get(key)
        if entry is None:
            others = ", ".join(sorted(found["datasets"])) or "none"
            return None, (
                f"no reference yet for dataset {key} ({path} holds {others}; this run's data, the first "
                "accepted of this dataset, becomes its reference)"
            )
        return entry["columns"], ""
    if set(found["columns"]) == set(columns):  # the old layout, of this dataset's columns
        return found["columns"], ""
    return None, (
        f"no reference yet for dataset {key} ({path} has the old one-dataset layout with other columns, "
        f"{sorted(found['columns'])[:8]}: another dataset's; it is replaced by this run's)"
    )


def write_reference(path: str | Path, key: str, entry: dict) -> None:
    """Write this dataset's entry, keeping the other datasets' (an old-layout file is replaced)."""
    path = Path(path)
    found = _load(path)
    datasets = dict(found["datasets"]) if found is not None and "datasets" in found else {}
    datasets[key] = entry
    write_json(path, {"datasets": datasets})
