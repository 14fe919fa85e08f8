"""Reading a model package safely: verified before anything in it is used.

A package is a directory (or its .tar.gz) that the package stage wrote: model.onnx, transform.json,
suite.yaml, MODEL_CARD.md, model.pt (the weights a warm start continues from) and manifest.json, which lists
every other file with its sha256. `open_package`
refuses a package unless
- manifest.json lists every file in the directory (an unlisted file, e.g. ONNX external data, is refused),
  the list is not empty and holds the files a package needs, and each file matches its sha256;
- model.onnx holds its weights itself (no external data: a path in it could point anywhere);
- with TRAINFLOW_SIGNING_KEY set, manifest.sig is an HMAC-SHA256 of manifest.json under that key.
An archive is extracted into a temporary directory, limited in size and file count (a compression bomb is
refused before it is written), and removed when the package is closed.

The champion (evaluate.champion) is checked once more, against a record outside it: a promoted champion is a
link to `.<name>.versions/<sha256 of its manifest.json>` (tasks/promote.py), so a manifest rewritten to
match altered files no longer matches the name the promotion gave it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.errors import UserError
from tasks.features import apply_transform
from tasks.files import MARKER, MARKER_TEXT, sha256_file

FORMAT_VERSION = 3  # 3: every file listed (the output marker too), unlisted files refused
NEEDED = ("model.onnx", "transform.json", "suite.yaml", "MODEL_CARD.md")
UNLISTED = ("manifest.json", "manifest.sig")  # the manifest cannot list itself; the signature signs it
SIGNING_ENV = "TRAINFLOW_SIGNING_KEY"
MAX_MEMBERS = 64
MAX_BYTES = 4 << 30
MAX_RATIO = 20  # unpacked / packed: ONNX weights hardly compress; a bomb is ~1000x
CHUNK = 65536
IMAGE_CHUNK = 256  # images scored at once
SAME = ("dataset", "target", "target_transform", "task", "classes", "inputs", "split")  # what a champion must share
SPLIT_RULE = "hash of dataset.key, else of every column but the target"  # (before: the whole row, target included)


class ModelPackage:
    """A verified package: `predict(frame)` maps raw feature columns to predictions (a number per row), or to
    class probabilities (n, K) in the order of `classes`; `labels(probabilities)` gives each row's label."""

    def __init__(self, directory: Path, manifest: dict):
        import onnxruntime as ort

        self.directory, self.manifest = directory, manifest
        self.transform = json.loads((directory / "transform.json").read_text())
        self.classes: list | None = self.transform.get("classes")
        self.session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        if self.transform.get("modality") == "image":  # encoded images, decoded and resized as in preprocess
            return self.run(self.pixels(frame))
        missing = [c for c in self.transform["inputs"] if c not in frame.columns]
        if missing:
            raise UserError(f"predict: input lacks columns {missing} that the model needs")
        return self.run(apply_transform(self.transform, frame))

    def run(self, x: np.ndarray) -> np.ndarray:
        """The ONNX model on transformed features (images: uint8 pixels), in chunks (bounded memory)."""
        if not len(x):
            return np.empty((0, len(self.classes)) if self.classes else 0, dtype=np.float32)
        chunk = CHUNK if x.ndim == 2 else IMAGE_CHUNK
        return np.concatenate([self.session.run(None, {"features": c})[0] for c in np.array_split(x, -(-len(x) // chunk))])

    def pixels(self, frame: pd.DataFrame) -> np.ndarray:
        """A frame's column of encoded images as the model's uint8 (n, C, H, W); an image that does not decode is
        an error here (batch inference, tasks/predict.py, rejects it with its reason instead)."""
        from tasks.images.decode import decode_all

        image = self.transform["image"]
        if image["column"] not in frame.columns:
            raise UserError(f"predict: input lacks the column {image['column']!r} of encoded images that the model needs")
        x, bad = decode_all(frame[image["column"]].tolist(), image["size"], image["channels"])
        if bad:
            row, reason = next(iter(bad.items()))
            raise UserError(f"predict: row {row}: {reason} ({len(bad)} such rows)")
        return x

    def labels(self, probabilities: np.ndarray) -> pd.Series:
        """The most probable class of each row, as a value of the target's type."""
        from tasks.features import label_value

        assert self.classes is not None, "a regression package predicts numbers"
        dtype = self.transform.get("label_dtype") or "str"
        values = [label_value(c, dtype) for c in self.classes]
        return pd.Series([values[i] for i in probabilities.argmax(1)], dtype="object" if dtype == "str" else None)


@contextmanager
def open_package(path: str | Path):
    """A verified package from a directory or a .tar.gz; an archive's temporary copy is removed on exit. A link
    (a promoted champion) is also checked against its promotion record."""
    path = Path(path)
    if path.is_symlink():
        yield ModelPackage(*verified_champion(path))
        return
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        tmp = Path(tempfile.mkdtemp(prefix="trainflow-package-"))
        try:
            yield ModelPackage(*verified(unpack(path, tmp)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    yield ModelPackage(*verified(path))


def verified(directory: Path) -> tuple[Path, dict]:
    """(directory, manifest) once every check passes; UserError naming what is wrong otherwise."""
    if not directory.is_dir():
        raise UserError(f"{directory}: no such package (a directory or a .tar.gz written by the package stage)")
    try:
        raw = (directory / "manifest.json").read_bytes()
        manifest = json.loads(raw)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise UserError(f"{directory}: not a Trainflow package (manifest.json unreadable: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise UserError(
            f"{directory}: package format {got} is not supported (this Trainflow reads format "
            f"{FORMAT_VERSION}); rebuild it with this version (dvc repro package)"
        )
    check_signature(directory, raw)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise UserError(f"{directory}: manifest.json lists no files, so nothing in the package could be checked; rebuild it")
    lacking = [n for n in NEEDED if n not in files]
    if lacking:
        raise UserError(f"{directory}: manifest.json does not list {lacking}; rebuild the package")
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() or p.is_symlink()}
    if MARKER in present and (directory / MARKER).read_text() == MARKER_TEXT:
        present.discard(MARKER)  # the output marker every staged directory gets (tasks/files.py)
    unlisted = sorted(present - set(files) - set(UNLISTED))
    if unlisted:
        raise UserError(
            f"{directory}: {unlisted} not listed in manifest.json; a package holds only the files it lists "
            "(ONNX external data included): rebuild it, or remove what was added"
        )
    home = directory.resolve()
    for name, digest in files.items():
        path = directory / name
        if path.is_symlink() or not path.is_file() or home not in path.resolve().parents:
            raise UserError(f"{directory}: {name} is missing or not a plain file of the package; rebuild or re-download it")
        if sha256_file(path) != digest:
            raise UserError(f"{directory}: {name} does not match its sha256 in manifest.json; the package was altered")
    check_onnx(directory / "model.onnx")
    return directory, manifest


def check_onnx(path: Path) -> None:
    """Refuse ONNX weights stored outside the file (external data names paths to read)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0]}); rebuild the package") from None
    graphs, external = [model.graph], []
    while graphs:
        g = graphs.pop()
        tensors = list(g.initializer) + [a.t for n in g.node for a in n.attribute if a.HasField("t")]
        external += [t.name for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]
        graphs += [a.g for n in g.node for a in n.attribute if a.HasField("g")]
        graphs += [sg for n in g.node for a in n.attribute for sg in a.graphs]
    if external:
        raise UserError(
            f"{path}: tensors {external[:5]} are stored as ONNX external data, which a package never holds "
            "(it could read any file); re-export with the weights inside the model (the package stage does)"
        )


def signature(manifest: bytes, key: str) -> str:
    return hmac.new(key.encode(), manifest, hashlib.sha256).hexdigest()


def check_signature(directory: Path, manifest: bytes) -> None:
    """With TRAINFLOW_SIGNING_KEY set, only a package signed with that key is used."""
    key = os.environ.get(SIGNING_ENV)
    if not key:
        return
    sig = directory / "manifest.sig"
    if not sig.exists():
        raise UserError(
            f"{directory}: unsigned package, and {SIGNING_ENV} is set: only signed packages are used. Build "
            f"it with {SIGNING_ENV} set, or unset it to use unsigned packages"
        )
    if not hmac.compare_digest(sig.read_text().strip(), signature(manifest, key)):
        raise UserError(
            f"{directory}: manifest.sig does not match manifest.json under {SIGNING_ENV}: the package was "
            "altered or signed with another key"
        )


def unpack(archive: Path, target: Path) -> Path:
    """Extract a package archive into `target`, refusing links, absolute or '..' names (the 'data' filter),
    more than MAX_MEMBERS files, and more bytes than MAX_BYTES or MAX_RATIO times the archive."""
    limit = min(MAX_BYTES, max(64 << 20, MAX_RATIO * archive.stat().st_size))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members, total = [], 0
            for m in tar:  # headers only: nothing is written before the totals are known
                members.append(m)
                total += m.size if m.isfile() else 0
                if len(members) > MAX_MEMBERS or total > limit:
                    raise UserError(
                        f"{archive}: unpacks to more than {MAX_MEMBERS} files or {limit:,} bytes, far more than a "
                        "model package; refused (a damaged or malicious archive)"
                    )
            tar.extractall(target, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{archive}: not a readable package archive ({e}); re-download or rebuild it") from None
    inner = list(target.iterdir())
    return inner[0] if len(inner) == 1 and inner[0].is_dir() else target


def versions_dir(champion: Path) -> Path:
    return champion.with_name(f".{champion.name}.versions")


def champion_record(champion: Path) -> str:
    """The manifest sha256 the promotion recorded for the champion: the name of the version its link points at."""
    if not champion.is_symlink():
        raise UserError(
            f"evaluate.champion: {champion} is a plain directory, not a promoted champion (promotion makes it a "
            f"link to {versions_dir(champion).name}/<manifest sha256>), so where it came from cannot be "
            f"checked. Move it away (mv {champion} {champion}.old) to make the next model the first champion"
        )
    target = Path(os.readlink(champion))
    if not (target.parent.name.startswith(".") and target.parent.name.endswith(".versions")) or len(target.name) != 64:
        raise UserError(
            f"evaluate.champion: {champion} points at {target}, not at a promoted version; restore it with "
            f"`ln -sfn {versions_dir(champion).name}/<sha256> {champion}`"
        )
    return target.name


def verified_champion(champion: Path) -> tuple[Path, dict]:
    """The champion, verified against its promotion record as well as its own manifest."""
    recorded = champion_record(champion)
    now = sha256_file(champion / "manifest.json") if (champion / "manifest.json").exists() else "none"
    if now != recorded:
        raise UserError(
            f"{champion}: manifest.json has sha256 {now[:12]}…, but the promotion recorded {recorded[:12]}…: "
            "the champion was altered after it was promoted"
        )
    return verified(champion)


def identity(manifest: dict) -> dict:
    """What a package predicts, from what: its dataset, target, target transform, task, classes, inputs and
    how rows were split (a champion split otherwise may have trained on this run's test rows)."""
    transform = manifest.get("transform") or {}
    split = manifest.get("split") or {  # a package of before: split by a hash of the whole row
        "key": manifest.get("key") or "the whole row",
        "fractions": list((manifest.get("params") or {}).get("preprocess", {}).get("split", {}).values()),
        "rule": "hash of dataset.key, else of the whole row",
    }
    return {
        "split": split,
        "dataset": manifest.get("data", {}).get("dataset"),
        "target": manifest.get("target"),
        "target_transform": transform.get("target_transform", "none"),
        "task": transform.get("task", "regression"),
        "classes": transform.get("classes"),
        "inputs": transform.get("inputs"),
    }


def check_comparable(champion: dict, candidate: dict, path: Path) -> None:
    """The gate compares models of the same thing only; a champion of another dataset, target, target scale,
    task or feature schema is refused, naming what differs."""
    differ = [k for k in SAME if champion.get(k) != candidate.get(k)]
    if not differ:
        return
    shown = "; ".join(f"{k}: champion {_short(champion.get(k))} vs this run {_short(candidate.get(k))}" for k in differ)
    raise UserError(
        f"evaluate: the champion at {path} predicts something else ({shown}), so the two cannot be compared and this "
        f"model is not promoted over it. Switch datasets with `trainflow use NAME` (each dataset and target keeps its own "
        f"champion), or, to make this model the first of a new line, move the champion aside deliberately "
        f"(mv {path} {path}.old)"
    )


def split_of(s) -> dict:
    """How this run's rows were split (recorded in the package manifest)."""
    fractions = s.preprocess.split
    return {
        "key": list(s.dataset.key) or "every column but the target",
        "fractions": [fractions.train, fractions.val, fractions.test],
        "rule": SPLIT_RULE,
    }


def _short(value) -> str:
    if isinstance(value, dict) and "rule" in value:  # a split
        return f"split by a hash of {value['key']}, fractions {value['fractions']}"
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
