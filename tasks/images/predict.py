"""Batch inference on images (tasks/predict.py dispatches here for an image package).

INPUT is a directory of image files (at any depth; hidden files skipped), or a Parquet table with the package's
column of encoded images (a `path` column, when present, names each row). Each image is decoded whole and checked
against the image rules of the package's suite (formats, width, height, channels), as in validation; one that
fails is rejected with its reason (`_reason`) instead of scored. Scored images are converted and resized exactly
as in preprocessing (tasks/images/decode.py) and the ONNX model normalises them. Predictions + rejects = inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import UserError
from tasks.images.decode import decode_all
from tasks.images.validate import load_image_suite

CHUNK = 1024  # images read and scored at once


def read_images(path: Path, column: str) -> Iterator[tuple[list, pd.DataFrame]]:
    """The input in chunks: the encoded images and their names (`path`, else the row number `_row`)."""
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(path).parts)),
            key=lambda p: p.relative_to(path).parts,
        )
        for start in range(0, len(files), CHUNK):
            part = files[start : start + CHUNK]
            yield [p.read_bytes() for p in part], pd.DataFrame({"path": [p.relative_to(path).as_posix() for p in part]})
        return
    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"predict: {path} is neither a directory of images nor a readable Parquet table ({e})") from None
    names = f.schema_arrow.names
    if column not in names:
        raise UserError(f"predict: {path} has no column {column!r} of encoded images (columns: {names}), which the model needs")
    offset = 0
    for batch in f.iter_batches(batch_size=CHUNK, columns=[column] + (["path"] if "path" in names else [])):
        n = batch.num_rows
        ids = {"path": batch.column("path").to_pylist()} if "path" in names else {"_row": np.arange(offset, offset + n)}
        yield batch.column(column).to_pylist(), pd.DataFrame(ids)
        offset += n


def count_images(path: Path) -> int:
    """The images of the input: what predictions + rejects must add up to."""
    if not path.exists():
        raise UserError(f"predict: {path} does not exist; give a directory of images or a Parquet table of image bytes")
    if path.is_dir():
        n = sum(1 for p in path.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(path).parts))
    else:
        try:
            n = pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"predict: {path} is neither a directory of images nor a readable Parquet table ({e})") from None
    if n == 0:
        raise UserError(f"predict: {path} holds no images to score")
    return n


def score_images(package, path: Path) -> Iterator[tuple[pd.DataFrame, np.ndarray, pd.DataFrame]]:
    """Per chunk: the names of the images scored, their class probabilities, and the rejected images with reasons."""
    image = package.transform["image"]
    rules = load_image_suite(package.directory / "suite.yaml").get("image") or {}
    offset = 0
    for blobs, ids in read_images(path, image["column"]):
        pixels, bad = decode_all(blobs, image["size"], image["channels"], rules)
        rejected = np.zeros(len(blobs), dtype=bool)
        rejected[list(bad)] = True
        rejects = ids[rejected].assign(_row=np.flatnonzero(rejected) + offset, _reason=[bad[i] for i in sorted(bad)])
        yield ids[~rejected].reset_index(drop=True), package.run(pixels), rejects.reset_index(drop=True)
        offset += len(blobs)
