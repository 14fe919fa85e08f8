"""The preprocess stage for images: decode and resize on Dask into uint8 shards, one Dask task per piece of
the validated table (about dataset.image.shard_rows images).

- Split: by a hash of each image's bytes (the same image always lands in the same split, duplicates
  included); with dataset.image.split: source, the source's test images are the test split and the rest is
  split into train and validation by the hash, in preprocess.split's train:val ratio.
- Output (preprocess.out_dir): <split>/images-NNNNN.npy (uint8, (n, C, H, W)) and labels-NNNNN.npy (int64 class
  indices) per piece and split; test_raw/ (the test images as they came, in the same order, for the package's
  checks); transform.json (classes, size, channels, per-channel mean and std of the train pixels in [0, 1]);
  schema.json (shape, classes, rows per split and class, the shard list the loader streams).
The pass writes labels as text first: the classes (the train split's labels) are known once every piece is done.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import UserError
from tasks.features import HASH_BUCKETS, VERSION, label_text
from tasks.files import write_json
from tasks.images.decode import decode_all
from tasks.tables import count_rows, parquet_files, pieces

SPLITS = ("train", "val", "test")


def splits_of(blobs: list[bytes], source_splits: list, fractions: tuple[float, float, float], by_source: bool) -> np.ndarray:
    """'train' / 'val' / 'test' per image, from a hash of its bytes (stable, order-free)."""
    bucket = np.array([int.from_bytes(hashlib.sha256(b or b"").digest()[:8], "big") % HASH_BUCKETS for b in blobs])
    train, val, test = fractions
    if by_source:
        cut = round(train / (train + val) * HASH_BUCKETS)
        out = np.where(bucket < cut, "train", "val")
        return np.where(np.array([x == "test" for x in source_splits], dtype=bool), "test", out)
    train_end, val_end = round(train * HASH_BUCKETS), round((train + val) * HASH_BUCKETS)
    return np.where(bucket < train_end, "train", np.where(bucket < val_end, "val", "test"))


def process_piece(
    piece, index: int, stage: str, column: str, target: str, size: list, channels: int, fractions, by_source: bool
) -> dict:
    """One piece: decoded, resized, split; its shards (labels as text for now) and raw test rows written; the
    train pixel sums and the images per split and label returned."""
    table = pq.ParquetFile(piece.file).read_row_groups(list(piece.row_groups))
    blobs = table.column(column).to_pylist()
    pixels, bad = decode_all(blobs, size, channels)
    if bad:
        row, reason = next(iter(bad.items()))
        raise UserError(
            f"preprocess: image {table.column('path')[row]} (row {piece.offset + row}) {reason}, though it passed "
            "validation; rerun the validate stage"
        )
    labels = label_text(table.column(target).to_pandas()).to_numpy(dtype=object)
    split = splits_of(blobs, table.column("split").to_pylist(), fractions, by_source)
    out: dict = {"counts": {}, "rows": {}, "sums": np.zeros(channels), "squares": np.zeros(channels), "pixels": 0}
    for name in SPLITS:
        mine = split == name
        if not mine.any():
            continue
        directory = Path(stage) / name
        directory.mkdir(exist_ok=True)
        np.save(directory / f"images-{index:05d}.npy", pixels[mine])
        np.save(directory / f"labels-{index:05d}.text.npy", labels[mine].astype(str))
        out["counts"][name], out["rows"][name] = Counter(labels[mine].tolist()), int(mine.sum())
        if name == "train":
            x = pixels[mine].astype(np.float64) / 255.0
            out["sums"], out["squares"] = x.sum(axis=(0, 2, 3)), (x * x).sum(axis=(0, 2, 3))
            out["pixels"] = int(x.shape[0] * x.shape[2] * x.shape[3])
        if name == "test":
            (Path(stage) / "test_raw").mkdir(exist_ok=True)
            pq.write_table(table.filter(pa.array(mine)), Path(stage) / "test_raw" / f"part-{index:05d}.parquet")
    return out


def first_pass(client, s, stage: Path) -> tuple[dict, list[dict]]:
    """Every piece processed on the cluster; the images per split and label, and each piece's result."""
    d, img, split = s.dataset, s.dataset.image, s.preprocess.split
    files = parquet_files(s.validate_.out)
    parts = pieces(files, img.shard_rows)
    if not count_rows(files):
        raise UserError(f"preprocess: {s.validate_.out} holds no images; check the source and the validation report")
    futures = client.map(
        process_piece,
        parts,
        range(len(parts)),
        stage=str(stage),
        column=img.column,
        target=d.target,
        size=list(img.size),
        channels=img.channels,
        fractions=(split.train, split.val, split.test),
        by_source=img.split == "source",
        pure=False,
    )
    results = client.gather(futures)
    counts: dict = {}
    for r in results:
        for name, c in r["counts"].items():
            counts.setdefault(name, Counter()).update(c)
    return {k: dict(v) for k, v in counts.items()}, results


def normalisation(results: list[dict]) -> dict:
    """Per-channel mean and std of the train pixels (in [0, 1]), from each piece's sums."""
    n = sum(r["pixels"] for r in results)
    mean = sum(r["sums"] for r in results) / n
    std = np.sqrt(np.maximum(sum(r["squares"] for r in results) / n - mean**2, 0.0))
    return {"mean": [float(m) for m in mean], "std": [float(x) or 1.0 for x in std]}  # a constant channel: std 1


def finish(stage: Path, s, classes: list[str], counts: dict, results: list[dict], label_dtype: str) -> dict:
    """Labels as class indices, the fitted normalisation, transform.json and schema.json."""
    d, img = s.dataset, s.dataset.image
    index = {c: i for i, c in enumerate(classes)}
    shards: dict = {name: [] for name in SPLITS}
    for name in SPLITS:
        for text in sorted((stage / name).glob("labels-*.text.npy")) if (stage / name).exists() else []:
            number = text.name.removeprefix("labels-").removesuffix(".text.npy")
            labels = np.array([index[t] for t in np.load(text)], dtype=np.int64)
            np.save(stage / name / f"labels-{number}.npy", labels)
            text.unlink()
            shards[name].append(
                {"images": f"{name}/images-{number}.npy", "labels": f"{name}/labels-{number}.npy", "rows": len(labels)}
            )
    rows = {name: sum(x["rows"] for x in shards[name]) for name in SPLITS}
    if min(rows.values()) == 0:
        raise UserError(f"preprocess: a split is empty ({rows}); give more images or change preprocess.split")
    image = {"column": img.column, "size": list(img.size), "channels": img.channels, **normalisation(results)}
    transform = {
        "version": VERSION,
        "modality": "image",
        "task": d.task,
        "target_transform": "none",
        "classes": classes,
        "label_dtype": label_dtype,
        "inputs": {img.column: {"size": list(img.size), "channels": img.channels}},
        "image": image,
        "features": [img.column],
        "target": d.target,
        "target_mean": 0.0,
        "target_std": 1.0,
        "numeric": {},
        "categorical": {},
    }
    schema = {
        "dataset": d.name,
        "task": d.task,
        "modality": "image",
        "features": [img.column],
        "target": d.target,
        "target_transform": "none",
        "classes": classes,
        "class_rows": {name: [counts.get(name, {}).get(c, 0) for c in classes] for name in SPLITS},
        "n_features": 0,
        "categorical": [],
        "image": image,
        "rows": rows,
        "shards": shards,
        "dropped_missing_target": 0,
    }
    write_json(stage / "transform.json", transform)
    write_json(stage / "schema.json", schema)
    return schema
