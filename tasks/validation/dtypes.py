"""The column types of a suite, and whether a pandas column holds one.

A suite names a family (float, int, bool, str, datetime) or an exact width (int8 … uint64, float32,
float64). A column matches whatever pandas made of it: a NumPy dtype, a nullable one (Int8, Float64,
boolean), a pandas string dtype, a category of text, a pyarrow-backed dtype, or object holding only values
of the type. Great Expectations 1.24 cannot match several of these by name (a time zone-aware timestamp,
Int8, string[python]), so Trainflow checks types itself, with this one function for every engine.
Timestamps are compared in UTC; a naive one is taken to be UTC.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

INT_WIDTHS = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
FLOAT_WIDTHS = ["float32", "float64"]
NUMERIC = ["float", *FLOAT_WIDTHS, "int", *INT_WIDTHS]
TYPES = [*NUMERIC, "bool", "str", "datetime"]

# a width: its dtype kind and bytes per value; a family: the kinds (and widths) it takes
_WIDTH = {f"{sign}int{bits}": ("u" if sign else "i", bits // 8) for sign in ("", "u") for bits in (8, 16, 32, 64)}
_WIDTH |= {"float32": ("f", 4), "float64": ("f", 8)}
_KINDS = {"int": "iu", "bool": "b", "datetime": "M"}
_OBJECT = {"str": ("string", "empty"), "bool": ("boolean", "empty")}  # what pandas infers for object columns


def type_ok(col: pd.Series, kind: str) -> bool:
    """Whether the column holds values of the suite type `kind`, whichever way pandas stores them."""
    dtype = col.dtype
    if _is_text_dtype(dtype):
        return kind == "str"
    if dtype.kind == "O":
        return kind in _OBJECT and pd.api.types.infer_dtype(col, skipna=True) in _OBJECT[kind]
    if kind in _WIDTH:
        return (dtype.kind, dtype.itemsize) == _WIDTH[kind]
    if kind == "float":
        return (dtype.kind, dtype.itemsize) in (_WIDTH["float32"], _WIDTH["float64"])
    return dtype.kind in _KINDS.get(kind, "")


def _is_text_dtype(dtype) -> bool:
    """A pandas string dtype, a pyarrow string, or a category of text."""
    if isinstance(dtype, pd.CategoricalDtype):
        return pd.api.types.infer_dtype(dtype.categories, skipna=True) in _OBJECT["str"]
    if isinstance(dtype, pd.ArrowDtype):
        return pa.types.is_string(dtype.pyarrow_dtype) or pa.types.is_large_string(dtype.pyarrow_dtype)
    return isinstance(dtype, pd.StringDtype)


def observed(col: pd.Series) -> str:
    """The column's type as the report shows it (object columns with what they hold)."""
    if col.dtype.kind == "O" and not _is_text_dtype(col.dtype):
        return f"object ({pd.api.types.infer_dtype(col, skipna=True)})"
    return str(col.dtype)


def type_words(kind: str) -> str:
    """What a suite type accepts, in words, for the report."""
    if kind == "float":
        return "type in ['float64', 'float32', 'Float64', 'Float32']"
    if kind == "int":
        return "an integer of any width (int8…int64, uint8…uint64, nullable Int8…UInt64)"
    if kind in _WIDTH:
        nullable = kind.replace("uint", "UInt").replace("int", "Int").replace("float", "Float")
        return f"type in ['{kind}', '{nullable}']"
    if kind == "bool":
        return "true/false (bool, nullable boolean, or object holding only True/False)"
    if kind == "datetime":
        return "a timestamp (datetime64 of any unit, naive or with a time zone)"
    return "text (object holding only str, a pandas string dtype, or a category of text)"


def as_utc(col: pd.Series) -> pd.Series:
    """A timestamp column in UTC (naive values taken as UTC), as the suite's bounds are compared."""
    return col.dt.tz_localize("UTC") if col.dt.tz is None else col.dt.tz_convert("UTC")


def utc_timestamp(value) -> pd.Timestamp:
    """A suite bound (ISO 8601 text) as a UTC timestamp; naive text is taken to be UTC."""
    t = pd.Timestamp(value)
    return t.tz_localize("UTC") if t.tz is None else t.tz_convert("UTC")
