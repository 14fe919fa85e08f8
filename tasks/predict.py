"""Batch inference with a model package.
Run: python -m tasks.predict PACKAGE INPUT OUTPUT [--rejects FILE]

PACKAGE is a package directory or its .tar.gz (every file's sha256 is checked first). INPUT is a CSV or
Parquet file, or a directory of Parquet files; inputs of more than one partition (PARTITION_ROWS rows of
whole row groups) are scored partition by partition on a local Dask cluster, in bounded memory. Each row is
checked against the package's expectation suite as it applies to rows to score:
- columns: every input column of the suite must be there (in any order); a column the suite does not know
  is refused (the target column may be present and is ignored); a column of the wrong type is refused;
- rows: a value out of its range, or missing where the suite allows none, sends the row to the rejects
  file (the input row, its row number `_row` and the reasons `_reason`) instead of the predictions;
- a category the model never saw is not an error: it gets the out-of-vocabulary code, and is counted.
OUTPUT (.parquet or .csv) holds the input's row key (the dataset's key columns, or `_row`) and
`prediction` (classification: the label, as the target's type, and `p_<label>`, each class's probability).
Predictions + rejects = input rows, always.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import UserError
from tasks.files import atomic_path, sha256_file

PARTITION_ROWS = 500_000


def scoring_suite(suite: dict, target: str) -> dict:
    """The training suite as it applies to rows to score: no target, no row count, no uniqueness, no list of
    allowed categories (unseen ones get the OOV code), and a column that may have nulls may have them anywhere."""
    columns = {}
    for name, spec in suite["columns"].items():
        if name == target:
            continue
        spec = {k: v for k, v in (spec or {}).items() if k not in ("values", "unique")}
        if spec.get("nulls"):
            spec["nulls"] = 1.0
        columns[name] = spec
    return {"columns": columns}


def check_columns(columns: list[str], suite: dict, target: str, source: str) -> None:
    expected = list(suite["columns"])
    missing = [c for c in expected if c not in columns]
    extra = [c for c in columns if c not in expected and c != target]
    if missing or extra:
        parts = ([f"lacks {missing}"] if missing else []) + ([f"has columns the model does not know: {extra}"] if extra else [])
        raise UserError(
            f"predict: {source} {' and '.join(parts)}; the package expects {expected} (any order; "
            f"{target!r} may be present and is ignored)"
        )


@dataclass
class Scored:
    predictions: pd.DataFrame
    rejects: pd.DataFrame
    unseen: dict


def score(package, frame: pd.DataFrame, offset: int, suite: dict, key: list[str], source: str) -> Scored:
    """One partition: validate its rows, predict the good ones, set the others aside with reasons."""
    from tasks.features import apply_transform
    from tasks.validation.report import describe_non_numbers, non_numbers, row_reasons
    from tasks.validation.suite import run_suite

    rows = frame.reset_index(drop=True)
    checked = rows[list(suite["columns"])]
    bad_types = non_numbers(checked, suite, offset)
    if bad_types:
        raise UserError(f"predict: {source}: " + "; ".join(describe_non_numbers(bad_types)))
    failed = [f for f in run_suite(checked, suite) if not f["success"]]
    mistyped = [f["column"] for f in failed if f["expectation"] == "expect_column_values_to_be_in_type_list"]
    if mistyped:
        c = mistyped[0]
        raise UserError(
            f"predict: {source}: column {c} holds {checked[c].dtype} values but the model needs "
            f"{suite['columns'][c]['type']}; convert the column (wrong types in {mistyped})"
        )
    table_level = [f for f in failed if not f.get("_rows")]
    if table_level:
        f = table_level[0]
        raise UserError(f"predict: {source}: {f['expectation']} failed for column {f['column']} ({f.get('observed')})")
    reasons = row_reasons(failed)
    good = rows.drop(index=reasons.index)
    predicted = package.run(apply_transform(package.transform, good))
    ids = good[key].reset_index(drop=True) if key else pd.DataFrame({"_row": good.index.to_numpy(dtype=np.int64) + offset})
    rejects = rows.loc[reasons.index].assign(
        _row=reasons.index.to_numpy(dtype=np.int64) + offset, _reason=reasons.to_numpy(dtype=object)
    )
    unseen = {}
    for name, p in package.transform["categorical"].items():
        values = good[name].dropna().astype(str)
        unseen[name] = int((~values.isin(set(p["vocabulary"]))).sum())
    return Scored(ids.assign(**predicted_columns(package, predicted)), rejects.reset_index(drop=True), unseen)


def predicted_columns(package, predicted: np.ndarray) -> dict:
    """`prediction`: the number, or the label (with one probability column `p_<label>` per class)."""
    if not package.classes:
        return {"prediction": predicted.astype(np.float64)}
    out = {"prediction": package.labels(predicted).to_numpy()}
    out |= {f"p_{c}": predicted[:, j].astype(np.float64) for j, c in enumerate(package.classes)}
    return out


def _score_piece(package_dir: str, version: str, piece, suite: dict, key: list[str], target: str, source: str) -> Scored:
    from tasks.modelpackage import ModelPackage
    from tasks.tables import read_piece

    package = _packages.get((package_dir, version))
    if package is None:  # verified by predict_file before any partition is scored
        package = _packages[(package_dir, version)] = ModelPackage(Path(package_dir), {})
    frame = read_piece(piece)
    return score(package, frame, piece.offset, suite, key, source)


_packages: dict = {}  # per process: one onnxruntime session per package, shared by the partitions it scores


def read_input(path: Path) -> tuple[list, pd.DataFrame | None, int]:
    """Parquet: its partitions (nothing read yet); CSV: the whole frame. Also the row count."""
    from tasks.tables import count_rows, parquet_files, pieces

    if not path.exists():
        raise UserError(f"predict: {path} does not exist; give a CSV or Parquet file or a directory of Parquet files")
    if path.is_dir() or _is_parquet(path):
        files = parquet_files(path)
        try:
            return pieces(files, PARTITION_ROWS), None, count_rows(files)
        except pa.ArrowException as e:
            raise UserError(f"predict: {path} is not a readable Parquet file ({e})") from None
    from tasks.ingest import read_table

    try:
        frame, _ = read_table(str(path))
    except UserError as e:
        raise UserError(str(e).replace("dataset.source: ", "predict: ")) from None
    from tasks.tables import as_validated

    return [], as_validated(frame), len(frame)


def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def predict_file(package_path: str | Path, input_path: str | Path, output: str | Path, rejects: str | Path | None = None) -> dict:
    """Score INPUT with the package; write predictions to OUTPUT and rejected rows to REJECTS; return counts."""
    from tasks.modelpackage import open_package

    t0 = time.perf_counter()
    with open_package(package_path) as package:  # an archive's temporary copy is removed at the end
        return _predict(package, Path(input_path), Path(output), rejects, t0)


def _predict(package, input_path: Path, output: Path, rejects: str | Path | None, t0: float) -> dict:
    from tasks.validation.suite import load_suite

    rejects = Path(rejects) if rejects else output.with_name(f"{output.stem}.rejects{output.suffix}")
    if output.suffix not in (".parquet", ".csv"):
        raise UserError(f"predict: {output}: give an output file ending in .parquet or .csv")
    if package.transform.get("modality") == "image":  # a directory or a table of images (tasks/images/predict.py)
        from tasks.images.predict import count_images, score_images

        n_rows, mode = count_images(input_path), "images"
        results = [
            Scored(ids.assign(**predicted_columns(package, p)), bad, {}) for ids, p, bad in score_images(package, input_path)
        ]
    else:
        target, key = package.manifest["target"], list(package.manifest.get("key") or [])
        suite = scoring_suite(load_suite(package.directory / "suite.yaml"), target)
        parts, frame, n_rows = read_input(input_path)
        if n_rows == 0:
            raise UserError(f"predict: {input_path} has no rows to score")
        columns = list(frame.columns) if frame is not None else pq.read_schema(parts[0].file).names
        check_columns(columns, suite, target, str(input_path))

        if frame is not None or len(parts) == 1:
            from tasks.tables import read_piece

            results = [score(package, frame if frame is not None else read_piece(parts[0]), 0, suite, key, str(input_path))]
            mode = "in memory"
        else:
            version = sha256_file(package.directory / "manifest.json")
            results = _on_dask(package.directory, version, parts, suite, key, target, str(input_path))
            mode = f"{len(parts)} partitions on Dask"
    n_pred, n_rej = sum(len(r.predictions) for r in results), sum(len(r.rejects) for r in results)
    assert n_pred + n_rej == n_rows, (n_pred, n_rej, n_rows)  # every row is either scored or rejected
    _write([r.predictions for r in results], output)
    _write([r.rejects for r in results], rejects)
    unseen = {c: sum(r.unseen.get(c, 0) for r in results) for c in package.transform["categorical"]}
    seconds = time.perf_counter() - t0
    return {
        "rows": n_rows,
        "predicted": n_pred,
        "rejected": n_rej,
        "unseen_categories": unseen,
        "output": str(output),
        "rejects": str(rejects),
        "mode": mode,
        "seconds": round(seconds, 3),
        "rows_per_s": round(n_rows / seconds, 1),
    }


def _on_dask(package_dir: Path, version: str, parts: list, suite: dict, key: list[str], target: str, source: str) -> list[Scored]:
    import dask
    from distributed import Client

    from tasks.cluster import local_client

    address = dask.config.get("scheduler-address", None)
    with Client(address, timeout=10) if address else local_client() as client:
        return client.gather(
            [
                client.submit(_score_piece, str(package_dir.resolve()), version, p, suite, key, target, source, pure=False)
                for p in parts
            ]
        )


def _write(frames: list[pd.DataFrame], path: Path) -> None:
    """Frames in order into one Parquet or CSV file, atomically (an empty file with the columns when no rows)."""
    frames = [f for f in frames if len(f)] or frames[:1]
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            for i, f in enumerate(frames):
                f.to_csv(tmp, mode="w" if i == 0 else "a", header=i == 0, index=False)
            return
        writer = None
        for f in frames:
            table = pa.Table.from_pandas(f, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table.cast(writer.schema))
        if writer is not None:
            writer.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tasks.predict", description=__doc__.split("\n")[0])
    ap.add_argument("package", help="package directory or .tar.gz (e.g. models/production)")
    ap.add_argument("input", help="CSV or Parquet file, or a directory of Parquet files")
    ap.add_argument("output", help="predictions: a .parquet or .csv file")
    ap.add_argument("--rejects", help="rows that failed validation (default: OUTPUT's name + .rejects)")
    a = ap.parse_args(argv)
    try:
        out = predict_file(a.package, a.input, a.output, a.rejects)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    unseen = ", ".join(f"{c} {n:,}" for c, n in out["unseen_categories"].items() if n) or "none"
    print(
        f"{out['rows']:,} rows: {out['predicted']:,} predicted -> {out['output']}, {out['rejected']:,} rejected -> "
        f"{out['rejects']}; unseen categories: {unseen}; {out['seconds']:.1f} s ({out['rows_per_s']:,.0f} rows/s, {out['mode']})"
    )


if __name__ == "__main__":
    main()
