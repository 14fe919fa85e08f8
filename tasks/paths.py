"""Where Trainflow may write: every output path is checked once, when the settings are read.

A stage replaces its output (a staged copy renamed over it), so an output path that names the wrong place
would destroy it. Every path a stage writes must therefore
- lie inside the project, and be neither its root nor a folder above it;
- not overlap another written path, an input (dataset.source, dataset.suite) or the champion;
- when the stage replaces it whole, neither be nor hold a file git tracks that no stage recorded in
  dvc.lock (sources, suites, dataset configs, code), nor the project's control files.
Each refusal names the keys involved. The champion (evaluate.champion) is deployment state of the
workspace: a relative path names a place in the workspace root, also from an experiment's worktree.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import yaml

from tasks.errors import UserError

# paths a stage replaces whole (a file or a directory), and directories a stage writes files into
REPLACED = [
    ("ingest", "out"),
    ("validate", "out"),
    ("validate", "quarantine"),
    ("validate", "report"),
    ("validate", "report_md"),
    ("validate", "reference"),
    ("preprocess", "out_dir"),
    ("train", "out_dir"),
    ("package", "out_dir"),
    ("package", "archive"),
    ("evaluate", "champion"),
]
WRITTEN_INTO = [("train", "log_dir"), ("evaluate", "out_dir"), ("search", "out_dir"), ("search", "storage")]
INPUTS = [("dataset", "source"), ("dataset", "suite")]
CONTROL = (".git", ".dvc", "params.yaml", "dvc.yaml", "dvc.lock", ".dvcignore", "pyproject.toml")


def workspace_root(cwd: Path | None = None) -> Path:
    """The workspace a run belongs to: the project root, also from an experiment's worktree or DVC's
    temporary experiment copies (both live under <root>/.dvc/tmp/)."""
    cwd = (cwd or Path.cwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 2] == (".dvc", "tmp"):
            return Path(*parts[:i])
    return cwd


def champion_path(champion: str, root: Path | None = None) -> Path:
    """evaluate.champion as a path: relative ones name a place in the workspace root."""
    path = Path(champion)
    return path if path.is_absolute() else workspace_root(root) / path


def _key(section: str, key: str) -> str:
    return f"{section}.{key}"


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies below it (by name, as Path.parents would say: thousands of calls per settings check)."""
    return a == b or str(a).startswith(str(b).rstrip("/") + "/")


@functools.lru_cache(maxsize=8)
def _tracked(root: Path, lock_mtime: float) -> frozenset[Path]:
    """Files git tracks that no stage produced (dvc.lock's outputs are products, e.g. committed metrics)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    if out.returncode:
        return frozenset()  # not a git repository: nothing is tracked
    files = {root / f for f in out.stdout.decode().split("\0") if f}
    lock = root / "dvc.lock"
    stages = ((yaml.load(lock.read_text(), Loader=yaml.CSafeLoader) or {}).get("stages") or {}) if lock.exists() else {}
    products = [root / o["path"] for st in stages.values() for o in (st.get("outs") or []) if "path" in o]
    return frozenset(f for f in files if not any(_inside(f, p) for p in products))


def _resolve(value: str, root: Path) -> Path:
    path = Path(value)
    return (path if path.is_absolute() else root / path).resolve()


def check_paths(raw: dict, root: Path) -> None:
    """Refuse settings (a params mapping) that would write outside the project or over something else."""
    root = root.resolve()
    written: dict[str, Path] = {}
    for section, key in REPLACED + WRITTEN_INTO:
        value = raw[section][key]
        written[_key(section, key)] = (
            champion_path(value, root) if (section, key) == ("evaluate", "champion") else _resolve(value, root)
        ).resolve()
    home = {k: workspace_root(root) if k == "evaluate.champion" else root for k in written}
    for name, path in written.items():
        if not _inside(path, home[name]) or path == home[name]:
            where = "is the project root" if path == home[name] else f"is outside the project {home[name]}"
            raise UserError(
                f"{name}: {raw[name.split('.')[0]][name.split('.')[1]]} {where}; a stage replaces what it "
                f"writes, so {name} must name a path of its own inside the project (the default is in params.yaml)"
            )
    names = list(written)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if _inside(written[a], written[b]) or _inside(written[b], written[a]):
                raise UserError(
                    f"{a} and {b} overlap ({written[a]} and {written[b]}); each stage output needs a path "
                    "of its own, or one stage would replace the other's; change one of them"
                )
    for section, key in INPUTS:
        value = raw[section][key]
        if "://" in value:
            continue
        source = _resolve(value, root)
        for name, path in written.items():
            if _inside(path, source) or _inside(source, path):
                raise UserError(
                    f"{name} overlaps {section}.{key} ({path} and {source}); an output must never replace an input; change {name}"
                )
    lock = root / "dvc.lock"
    protected = set(_tracked(root, lock.stat().st_mtime if lock.exists() else 0.0)) | {root / c for c in CONTROL}
    for section, key in REPLACED:
        name = _key(section, key)
        hit = next((p for p in sorted(protected) if _inside(p, written[name])), None)
        if hit is not None:
            raise UserError(
                f"{name}: {written[name]} {'is' if hit == written[name] else 'holds'} "
                f"{hit.relative_to(root) if _inside(hit, root) else hit}, "
                f"which git tracks (or the project needs) and no stage produced; a stage replaces "
                f"{name} whole, so point it at a path of its own"
            )
