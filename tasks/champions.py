"""Champions per dataset: `models/production` is the champion of the dataset params.yaml trains on; every
dataset and target's champion is also linked from `models/.production.datasets/<dataset>--<target>`, so
switching datasets (`trainflow use`) switches champions, and no model is gated against another dataset's.
Links are switched atomically (a new link renamed over the old one)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path


def switch(link: Path, target: Path) -> None:
    """Point `link` at `target` atomically: a new link renamed over the old one."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def dataset_key(name: str, target: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}--{target}")


def datasets_dir(champion: Path) -> Path:
    return champion.with_name(f".{champion.name}.datasets")


def dataset_versions(champion: Path) -> set[str]:
    """The versions some dataset's champion links to (never pruned)."""
    where = datasets_dir(champion)
    return {Path(os.readlink(link)).name for link in where.iterdir() if link.is_symlink()} if where.is_dir() else set()


def own_key(champion: Path) -> str | None:
    """The dataset key of the champion's own manifest (None when it cannot be read)."""
    try:
        manifest = json.loads((champion / "manifest.json").read_text())
        return dataset_key(manifest["data"]["dataset"], manifest["target"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def switch_dataset(champion: Path, old: str, new: str) -> str:
    """After `trainflow use`: keep the old dataset's champion under its key, and make the new dataset's (if it
    has one) the champion; with none, there is no champion until its first promotion. Says what it did."""
    per_dataset = datasets_dir(champion)
    if champion.is_symlink():  # kept under the key of the dataset it was trained on (its manifest says)
        per_dataset.mkdir(exist_ok=True)
        switch(per_dataset / (own_key(champion) or old), Path("..") / os.readlink(champion))
    elif champion.exists():
        return f"{champion} is not a promoted champion (a plain directory); left as it is"
    if old == new:
        return f"champion: {champion} (unchanged)"
    mine = per_dataset / new
    if mine.is_symlink():
        switch(champion, Path(os.readlink(mine)).relative_to(".."))
        return f"champion: {champion} -> the {new} champion ({Path(os.readlink(mine)).name[:12]}…)"
    champion.unlink(missing_ok=True)
    champion.with_name(f"{champion.name}.previous").unlink(missing_ok=True)
    kept = f"; the {old} champion is kept for when you switch back" if (per_dataset / old).is_symlink() else ""
    return f"champion: none yet for {new} (its first model that beats the baseline becomes it){kept}"
