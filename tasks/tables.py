"""Parquet input as a file or a directory of files, cut into partitions of whole row groups.

A partition (`Piece`) knows its global row offset, so results computed on it in parallel (row numbers of
failing rows, sample rows) are reported in the numbering of the whole dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from tasks.settings import UserError


def parquet_files(path: str | Path) -> list[Path]:
    """A Parquet file, or the *.parquet files of a directory in name order (hidden and _ files skipped)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")) and p.is_file())
    if not files:
        raise UserError(f"{path} is a directory without .parquet files; give a Parquet file or a directory of them")
    return files


def count_rows(files: list[Path]) -> int:
    return sum(pq.read_metadata(f).num_rows for f in files)


@dataclass(frozen=True)
class Piece:
    file: str
    row_groups: tuple[int, ...]
    offset: int  # global row number of its first row
    rows: int


def pieces(files: list[Path], max_rows: int) -> list[Piece]:
    """Cut the files into pieces of consecutive row groups of at most max_rows rows (one row group at least)."""
    out: list[Piece] = []
    offset = 0
    for f in files:
        md = pq.read_metadata(f)
        groups: list[int] = []
        n = 0
        for g in range(md.num_row_groups):
            r = md.row_group(g).num_rows
            if groups and n + r > max_rows:
                out.append(Piece(str(f), tuple(groups), offset, n))
                offset, groups, n = offset + n, [], 0
            groups.append(g)
            n += r
        if groups:
            out.append(Piece(str(f), tuple(groups), offset, n))
            offset += n
    return [p for p in out if p.rows]


def as_validated(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows numbered 0.. (an index the writer stored is dropped), text columns as object: GX 1.24 does not
    recognise pandas 3's default "str" dtype as a string type; object holds the same values."""
    frame = frame.reset_index(drop=True)
    return frame.astype({c: object for c, t in frame.dtypes.items() if isinstance(t, pd.StringDtype)})


def read_piece(piece: Piece) -> pd.DataFrame:
    return as_validated(pq.ParquetFile(piece.file).read_row_groups(list(piece.row_groups)).to_pandas())


def read_all(files: list[Path]) -> pd.DataFrame:
    frames = [pq.read_table(f).to_pandas() for f in files]
    return as_validated(frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True))


def read_column(files: list[str] | list[Path], name: str) -> pd.Series:
    """One column of all the files, in order (for statistics over the whole column)."""
    parts = [pq.read_table(f, columns=[name]).column(name).to_pandas() for f in files]
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
