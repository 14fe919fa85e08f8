"""The ingest stage for images: a source into one raw Parquet table, streamed in row groups of ROW_GROUP images
(dataset.image.shard_rows when smaller: preprocess cuts its shards along row groups).

Sources (dataset.source):
- a directory in class-subfolder layout, root/<label>/<file> (with dataset.image.split: source,
  root/train/<label>/<file> and root/test/<label>/<file>); every file in a class folder is taken as an image
  (validate decides whether it is one); hidden files are skipped; an empty class folder is refused;
- a directory of IDX files (MNIST, Fashion-MNIST): each `<prefix>-images-idx3-ubyte[.gz]` with its
  `<prefix>-labels-idx1-ubyte[.gz]`; the t10k (or test) pair is the source's test split; pixels stored as PNG;
- a Parquet file with a column of encoded image bytes (dataset.image.column) and a label column (dataset.target).
The raw table: the image bytes, the label, `path` (where the image came from) and `split` (the source's own
train/test, or null). A directory's sha256 is tasks/files.sha256_path's: every file, hidden ones included.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import PurePosixPath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import UserError
from tasks.files import MARKER, copy_stream, staged_path, tree_digest
from tasks.images.decode import encode_png

ROW_GROUP = 1024  # images per row group of the raw table
IDX_IMAGES = re.compile(r"^(?P<prefix>.+)-images[-.]idx3-ubyte(?P<gz>\.gz)?$")


def ingest_images(s) -> dict:
    d, img = s.dataset, s.dataset.image
    fs, root = fsspec.core.url_to_fs(d.source)
    if not fs.exists(root):
        raise UserError(f"dataset.source: {d.source} does not exist; set it to an image directory, IDX files or a Parquet file")
    digests: list[tuple[str, str]] = []  # (relative name, sha256) of every file read, for the directory's sha256
    with staged_path(s.ingest.out) as out:
        if fs.isdir(root):
            names = _files(fs, root)
            pairs = idx_pairs(names)
            batches = idx_batches(fs, root, names, pairs, d, digests) if pairs else folder_batches(fs, root, names, d, digests)
        else:
            batches = parquet_batches(fs, root, d, out.with_name("source.parquet"), digests)
        rows, labels = write_batches(batches, out, img.column, d.target, min(ROW_GROUP, img.shard_rows))
        if rows == 0:
            raise UserError(f"dataset.source: {d.source} holds no images")
        digest = digests[0][1] if not fs.isdir(root) else tree_digest(sorted(digests, key=lambda e: PurePosixPath(e[0]).parts))
        if d.sha256 is not None and digest != d.sha256:
            raise UserError(
                f"dataset.sha256: {d.source} has sha256 {digest}, expected {d.sha256}; the data changed: restore it, "
                "or set dataset.sha256 to the new hash (or null) if the change is intended"
            )
    return {"rows": rows, "classes": dict(sorted(labels.items())), "sha256": digest, "out": s.ingest.out}


def _files(fs, root: str) -> list[str]:
    """Every file under root, as a name relative to it (the output marker aside)."""
    base = root.rstrip("/") + "/"
    names = [p[len(base) :] if p.startswith(base) else p for p in fs.find(root)]
    return sorted((n for n in names if n != MARKER), key=lambda n: PurePosixPath(n).parts)


def _read(fs, root: str, name: str, digests: list) -> bytes:
    with fs.open(f"{root.rstrip('/')}/{name}", "rb") as f:
        data = f.read()
    digests.append((name, hashlib.sha256(data).hexdigest()))
    return data


def _table(images: list, labels, paths: list, splits: list, column: str, target: str) -> pa.Table:
    return pa.table(
        {
            column: pa.array(images, pa.binary()),
            target: labels,
            "path": pa.array(paths, pa.string()),
            "split": pa.array(splits, pa.string()),
        }
    )


def write_batches(batches: Iterator[pa.Table], out, column: str, target: str, group: int) -> tuple[int, Counter]:
    """The raw table in row groups of `group` images; rows and the images per label."""
    writer, rows, labels = None, 0, Counter[str]()
    try:
        for table in batches:
            if writer is None:
                writer = pq.ParquetWriter(out, table.schema)
            writer.write_table(table.cast(writer.schema), row_group_size=group)
            rows += table.num_rows
            labels.update(str(v) for v in table.column(target).to_pylist())
    finally:
        if writer is not None:
            writer.close()
    return rows, labels


def class_folders(fs, root: str, names: list[str], d) -> list[str]:
    """The class folders (root/<label>, or root/<split>/<label>), each checked to hold at least one image."""
    depth = 3 if d.image.split == "source" else 2
    layout = "root/train/<label>/<file> and root/test/<label>/<file>" if depth == 3 else "root/<label>/<file>"
    for name in names:
        parts = PurePosixPath(name).parts
        if not any(p.startswith(".") for p in parts) and (
            len(parts) != depth or (depth == 3 and parts[0] not in ("train", "test"))
        ):
            raise UserError(
                f"dataset.source: {d.source}/{name} is not in a class folder; an image directory is laid out as {layout}"
            )
    tops = ["train", "test"] if depth == 3 else [""]
    folders = []
    for top in tops:
        where = f"{root.rstrip('/')}/{top}".rstrip("/")
        if not fs.isdir(where):
            raise UserError(
                f"dataset.source: {d.source} has no {top}/ folder; with dataset.image.split: source it is laid out as {layout}"
            )
        subdirs = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(where, detail=False) if fs.isdir(p))
        folders += [f"{top}/{c}".lstrip("/") for c in subdirs if not c.startswith(".")]
    held = {str(PurePosixPath(n).parent) for n in names if not PurePosixPath(n).name.startswith(".")}
    empty = [f for f in folders if f not in held]
    if empty:
        raise UserError(
            f"dataset.source: class folder {d.source}/{empty[0]} is empty ({len(empty)} empty in all); every class needs images: "
            "add them, or remove the folder"
        )
    if not folders:
        raise UserError(f"dataset.source: {d.source} has no class folders; an image directory is laid out as {layout}")
    return folders


def folder_batches(fs, root: str, names: list[str], d, digests: list) -> Iterator[pa.Table]:
    class_folders(fs, root, names, d)
    images: list[bytes] = []
    labels: list[str] = []
    paths: list[str] = []
    splits: list[str | None] = []
    for name in names:
        data = _read(fs, root, name, digests)
        parts = PurePosixPath(name).parts
        if any(p.startswith(".") for p in parts):
            continue  # hashed (it is part of the directory), not an image
        images.append(data)
        labels.append(parts[-2])
        paths.append(name)
        splits.append(parts[0] if d.image.split == "source" else None)
        if len(images) == ROW_GROUP:
            yield _table(images, labels, paths, splits, d.image.column, d.target)
            images, labels, paths, splits = [], [], [], []
    if images:
        yield _table(images, labels, paths, splits, d.image.column, d.target)


def idx_pairs(names: list[str]) -> list[tuple[str, str, str]]:
    """(split, images file, labels file) for each IDX image file of a directory."""
    pairs = []
    for name in names:
        found = IDX_IMAGES.match(PurePosixPath(name).name)
        if not found:
            continue
        labels = str(PurePosixPath(name).with_name(f"{found['prefix']}-labels-idx1-ubyte{found['gz'] or ''}"))
        if labels not in names:
            raise UserError(f"dataset.source: {name} has no labels file {labels} beside it (IDX images come with their labels)")
        pairs.append(("test" if found["prefix"].startswith(("t10k", "test")) else "train", name, labels))
    return pairs


def read_idx(data: bytes, name: str, dims: int) -> np.ndarray:
    """An IDX file (gzipped or not) of unsigned bytes with `dims` dimensions, as a uint8 array."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise UserError(
                f"dataset.source: {name} is a corrupt or truncated gzip file ({e}); reinstall or re-download it"
            ) from None
    if len(data) < 4 + 4 * dims or data[:4] != bytes([0, 0, 8, dims]):
        raise UserError(
            f"dataset.source: {name} is not an IDX file of {dims}-dimensional unsigned bytes (magic {data[:4].hex()})"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    start, size = 4 + 4 * dims, int(np.prod(shape))
    if len(data) - start != size:
        raise UserError(f"dataset.source: {name} holds {len(data) - start:,} bytes of data, its header says {size:,}: truncated")
    return np.frombuffer(data, np.uint8, offset=start).reshape(shape)


def idx_batches(fs, root: str, names: list[str], pairs: list, d, digests: list) -> Iterator[pa.Table]:
    label_names = list(d.image.names)
    for split, image_file, label_file in pairs:
        images = read_idx(_read(fs, root, image_file, digests), image_file, 3)
        labels = read_idx(_read(fs, root, label_file, digests), label_file, 1)
        if len(images) != len(labels):
            raise UserError(f"dataset.source: {image_file} holds {len(images):,} images but {label_file} {len(labels):,} labels")
        if label_names and int(labels.max()) >= len(label_names):
            raise UserError(
                f"dataset.image.names: {label_file} has label {int(labels.max())}, but only {len(label_names)} names are given"
            )
        for start in range(0, len(images), ROW_GROUP):
            part = slice(start, start + ROW_GROUP)
            values = [label_names[v] for v in labels[part]] if label_names else labels[part].astype(np.int64)
            yield _table(
                [encode_png(x) for x in images[part]],
                values,
                [f"{image_file}#{i}" for i in range(start, min(start + ROW_GROUP, len(images)))],
                [split if d.image.split == "source" else None] * len(images[part]),
                d.image.column,
                d.target,
            )
    read = {n for _, *files in pairs for n in files}
    for name in names:  # the directory's other files are part of its sha256
        if name not in read:
            _read(fs, root, name, digests)


def parquet_batches(fs, root: str, d, copy, digests: list) -> Iterator[pa.Table]:
    """A Parquet source: copied (and hashed) once, then read a row group's worth at a time."""
    with fs.open(root, "rb") as src:
        digests.append((PurePosixPath(root).name, copy_stream(src, copy)))
    try:
        f = pq.ParquetFile(copy)
    except pa.ArrowException as e:
        raise UserError(f"dataset.source: {d.source} is neither an image directory nor a readable Parquet file ({e})") from None
    column, names = d.image.column, f.schema_arrow.names
    needed = [column, d.target] + (["split"] if d.image.split == "source" else [])
    missing = [c for c in needed if c not in names]
    if missing:
        raise UserError(
            f"dataset.source: {d.source} lacks the columns {missing} (columns: {names}); set dataset.image.column to its "
            "column of image bytes and dataset.target to its label column"
        )
    kind = f.schema_arrow.field(column).type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise UserError(f"dataset.image.column: column {column!r} of {d.source} holds {kind}, not image bytes (binary)")
    offset = 0
    for batch in f.iter_batches(batch_size=ROW_GROUP, columns=needed + (["path"] if "path" in names else [])):
        n = batch.num_rows
        paths = batch.column("path").cast(pa.string()).to_pylist() if "path" in names else [f"row {offset + i}" for i in range(n)]
        splits = batch.column("split").cast(pa.string()).to_pylist() if d.image.split == "source" else [None] * n
        bad = sorted({str(v) for v in splits if v not in ("train", "test") and d.image.split == "source"})
        if bad:
            raise UserError(
                f"dataset.source: column split of {d.source} holds {bad[:5]}; with dataset.image.split: source "
                "it is train or test"
            )
        yield _table(batch.column(column).to_pylist(), batch.column(d.target).to_pylist(), paths, splits, column, d.target)
        offset += n
