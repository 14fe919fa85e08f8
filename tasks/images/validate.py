"""The validate stage for images: every image decoded whole and checked against the suite, on Dask.

The suite (data/suites/<dataset>.yaml, `modality: image`) holds
- `row_count: {min, max}`: a table-level check (always stops the run);
- `image: {formats: [PNG, ...], width: {min, max}, height: {min, max}, channels: [1, 3, ...]}`;
- `labels: [...]`: the label set.
Row-level failures (an undecodable or truncated file, a format, size or channel count outside the suite, a
label outside the set or missing) stop the run naming each kind with a sample file, or, with
validate.on_failure: quarantine, move the images aside (validate.quarantine: the row, its path, label, bytes
and reason). Class balance is compared with the last accepted data of the same dataset (its entry of
validate.reference, tasks/validation/reference.py): a class new or gone,
or a population stability index of the class shares above validate.drift_max_psi, is drift (validate.drift).
The report has the table report's shape (tasks/validation/report.py renders it).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from tasks.cluster import dask_client
from tasks.errors import UserError
from tasks.features import label_text
from tasks.files import copy_and_hash, sha256_path, staged_path
from tasks.images.decode import EXPECTATIONS, open_image, problems
from tasks.tables import count_rows, parquet_files, pieces
from tasks.validation.reference import dataset_key, read_reference, write_reference
from tasks.validation.report import drift_skipped, write_reports

log = logging.getLogger(__name__)
PIECE_ROWS = 8192  # images checked per Dask task
SAMPLES = 5
EPS = 1e-4  # floor of a class's share in the PSI


def load_image_suite(path: str | Path) -> dict:
    path = Path(path)
    try:
        suite = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"dataset.suite: {path} does not exist; point dataset.suite at an image suite YAML") from None
    except yaml.YAMLError as e:
        raise UserError(f"dataset.suite: {path} is not a plain YAML suite ({str(e).splitlines()[0]})") from None
    if not isinstance(suite, dict) or suite.get("modality") != "image":
        raise UserError(
            f"dataset.suite: {path} is not an image suite (it must say `modality: image`); see data/suites/fashion_mnist.yaml"
        )
    unknown = sorted(set(suite) - {"modality", "row_count", "image", "labels"})
    unknown += sorted(f"image.{k}" for k in set(suite.get("image") or {}) - {"formats", "width", "height", "channels"})
    if unknown:
        raise UserError(
            f"dataset.suite: {path}: unknown keys {unknown}; an image suite has row_count, image (formats, width, "
            "height, channels) and labels"
        )
    return suite


def check_piece(piece, rules: dict, labels: list[str] | None, column: str, target: str) -> dict:
    """One piece of the raw table: the failing rows with their reasons, and the images per label (all rows)."""
    table = pq.ParquetFile(piece.file).read_row_groups(list(piece.row_groups), columns=[column, target, "path"])
    texts = label_text(table.column(target).to_pandas()).astype(object).where(lambda x: x.notna(), None).tolist()
    failed = []
    allowed = set(labels) if labels is not None else None
    for i, (data, label, path) in enumerate(zip(table.column(column).to_pylist(), texts, table.column("path").to_pylist())):
        found = []
        try:
            found = problems(open_image(data), rules)
        except ValueError as e:
            found = [("decode", str(e))]
        if label is None:
            found.append(("label", "the label is missing"))
        elif allowed is not None and label not in allowed:
            found.append(("label", f"label {label!r} is not in the suite's labels"))
        if found:
            failed.append((piece.offset + i, path, label, found))
    return {"failed": failed, "labels": Counter(t for t in texts if t is not None)}


def results_of(failed: list, n_rows: int, suite: dict, column: str, target: str) -> list[dict]:
    """One result per check, in the table report's shape (count, percent, sample rows and files)."""
    rc = suite.get("row_count") or {}
    lo, hi = rc.get("min", 0), rc.get("max")
    results = [
        {
            "expectation": "expect_table_row_count_to_be_between",
            "column": None,
            "success": n_rows >= lo and (hi is None or n_rows <= hi),
            "bound": f"between {lo} and {hi}",
            "observed": n_rows,
        }
    ]
    rules = suite.get("image") or {}
    checks = ["decode"] + [
        c for c, key in (("format", "formats"), ("size", "width"), ("size", "height"), ("channels", "channels")) if key in rules
    ]
    checks += ["label"]
    for check in dict.fromkeys(checks):
        hits = [(row, path, what) for row, path, _, found in failed for c, what in found if c == check]
        results.append(
            {
                "expectation": EXPECTATIONS[check],
                "column": target if check == "label" else column,
                "success": not hits,
                "bound": _bound(check, rules, suite),
                "unexpected_count": len(hits),
                "unexpected_percent": round(100 * len(hits) / max(n_rows, 1), 4),
                "sample_values": [f"{path}: {what}" for _, path, what in hits[:SAMPLES]],
                "sample_rows": [row for row, _, _ in hits[:SAMPLES]],
            }
        )
    return results


def _bound(check: str, rules: dict, suite: dict) -> str:
    if check == "decode":
        return "a whole image Pillow decodes"
    if check == "format":
        return f"one of {rules['formats']}"
    if check == "size":
        w, h = rules.get("width") or {}, rules.get("height") or {}
        return f"width {w.get('min', 0)}..{w.get('max', '∞')}, height {h.get('min', 0)}..{h.get('max', '∞')}"
    if check == "channels":
        return f"one of {rules['channels']}"
    labels = suite.get("labels")
    return "a label" if labels is None else f"one of {labels[:8]}" + (f" (+{len(labels) - 8} more)" if len(labels) > 8 else "")


def class_drift(reference: dict | None, counts: Counter, target: str, max_psi: float) -> dict:
    """{target: findings} when the class shares moved beyond max_psi or a class is new or gone, else {}."""
    ref = ((reference or {}).get(target) or {}).get("categories")
    if ref is None:
        return {}
    total = sum(counts.values()) or 1
    classes = sorted(set(ref) | set(counts))
    e = np.maximum([ref.get(c, 0.0) for c in classes], EPS)
    a = np.maximum([counts.get(c, 0) / total for c in classes], EPS)
    index = float(np.sum((a - e) * np.log(a / e)))
    new, gone = sorted(set(counts) - set(ref)), sorted(set(ref) - set(counts))
    if index > max_psi or new or gone:
        return {target: {"psi": round(index, 4), "new_categories": new[:20], "vanished_categories": gone[:20]}}
    return {}


def failure_line(failed: list, results: list, n_rows: int, raw: Path, suite_path: str, report: str) -> str:
    """The one line a failed validation stops with: each failed check, its count and a sample file."""
    parts = []
    for r in results:
        if r["success"]:
            continue
        if "unexpected_count" in r:
            parts.append(f"{r['unexpected_count']:,} × {r['expectation']} (e.g. {r['sample_values'][0]})")
        else:
            parts.append(f"{r['expectation']}: observed {r['observed']:,}, required {r['bound']}")
    return (
        f"validate: {len(failed):,} of {n_rows:,} images of {raw} fail {suite_path}: {'; '.join(parts)}. Fix or remove those "
        f"files, or set validate.on_failure: quarantine to set them aside (report: {report})"
    )


def validate_images(s) -> dict:
    cfg, d = s.validate_, s.dataset
    suite = load_image_suite(d.suite)
    raw = Path(s.ingest.out)
    if not raw.exists():
        raise UserError(f"validate: {raw} does not exist; run the ingest stage first (python -m tasks.ingest)")
    files = parquet_files(raw)
    n_rows, parts = count_rows(files), pieces(files, PIECE_ROWS)
    labels = [str(v) for v in suite["labels"]] if suite.get("labels") is not None else None
    with dask_client(s.dask, "validate") as client:
        futures = client.map(
            check_piece, parts, rules=suite.get("image") or {}, labels=labels, column=d.image.column, target=d.target
        )
        checked = client.gather(futures)
    failed = [f for c in checked for f in c["failed"]]
    counts: Counter[str] = sum((c["labels"] for c in checked), Counter())
    results = results_of(failed, n_rows, suite, d.image.column, d.target)
    table_ok = results[0]["success"]
    quarantining = cfg.on_failure == "quarantine" and bool(failed) and table_ok
    n_clean = n_rows - len(failed) if quarantining else n_rows
    success = table_ok and (not failed or (quarantining and n_clean >= cfg.min_clean_fraction * n_rows))
    report = new_report(cfg, d.suite, raw, n_rows, n_clean, results, success, len(parts))
    if not success:
        report["data"]["sha256"] = sha256_path(raw)
        write_reports(cfg, report)
        if quarantining:
            raise UserError(
                f"validate: only {n_clean:,} of {n_rows:,} images of {raw} pass ({n_clean / n_rows:.1%}), fewer than "
                f"validate.min_clean_fraction={cfg.min_clean_fraction}: "
                + failure_line(failed, results, n_rows, raw, d.suite, cfg.report)
            )
        raise UserError(failure_line(failed, results, n_rows, raw, d.suite, cfg.report))
    return accept(s, raw, files, failed if quarantining else [], counts, report)


def new_report(cfg, suite_path: str, raw: Path, n_rows: int, n_clean: int, results: list, success: bool, partitions: int) -> dict:
    passed = sum(r["success"] for r in results)
    return {
        "success": success,
        "modality": "image",
        "data": {"path": str(raw), "sha256": None, "rows": n_rows},
        "rows": {"input": n_rows, "clean": n_clean, "quarantined": n_rows - n_clean},
        "suite": suite_path,
        "checked": {"mode": "images", "partitions": partitions},
        "evaluated": len(results),
        "passed": passed,
        "pass_rate": round(passed / len(results), 6),
        "results": results,
        "drift": {"checked": False, "policy": cfg.drift, "reference": str(cfg.reference), "columns": {}, "reason": None},
    }


def accept(s, raw: Path, files: list[Path], failed: list, counts: Counter, report: dict) -> dict:
    """Accepted: the clean images to validate.out, the failing ones to the quarantine, drift checked, the reference."""
    cfg, d = s.validate_, s.dataset
    reference_path, key = Path(cfg.reference), dataset_key(d.name, d.target)
    reference, why = read_reference(reference_path, key, [d.target]) if cfg.drift != "off" else (None, "")
    for _, _, label, _ in failed:
        if label is not None and label in counts:
            counts[label] -= 1
    counts = +counts  # (classes left without images dropped)
    reasons = {
        row: "; ".join(f"{d.image.column if c != 'label' else d.target}: {EXPECTATIONS[c]} ({w})" for c, w in found)
        for row, _, _, found in failed
    }
    with staged_path(cfg.out) as out, staged_path(cfg.quarantine) as quarantine:
        report["data"]["sha256"] = copy_and_hash(raw, out) if not reasons else sha256_path(raw)
        split_rows(files, reasons, out if reasons else None, quarantine)
        drifted = class_drift(reference, counts, d.target, cfg.drift_max_psi) if reference is not None else {}
        report["drift"].update(
            checked=reference is not None,
            columns=drifted,
            reason=None if reference is not None else drift_skipped(cfg, True, why),
        )
        if drifted:
            f = drifted[d.target]
            message = (
                f"validate: the class balance of {raw} drifted from the last accepted data of {key} ({reference_path}): PSI "
                f"{f['psi']:.3f} (max validate.drift_max_psi={cfg.drift_max_psi}), new classes {f['new_categories']}, "
                f"gone {f['vanished_categories']}"
            )
            if cfg.drift == "fail":
                report["success"] = False
                write_reports(cfg, report)
                raise UserError(f"{message}. If the change is expected, accept it with one run at validate.drift: warn")
            log.warning(message)
        report["validated"] = {"path": cfg.out, "sha256": sha256_path(out)}
    write_reports(cfg, report)
    total = sum(counts.values())
    stats = {
        d.target: {"count": total, "null_rate": 0.0, "categories": {k: round(v / total, 6) for k, v in sorted(counts.items())}}
    }
    write_reference(reference_path, key, {"data_sha256": report["data"]["sha256"], "rows": total, "columns": stats})
    if reasons:
        log.warning("validate: quarantined %d of %d images (%s)", len(reasons), report["rows"]["input"], cfg.quarantine)
    return {k: report[k] for k in ("success", "evaluated", "passed", "pass_rate", "rows", "checked")} | {"drift": drifted}


def split_rows(files: list[Path], reasons: dict[int, str], out: Path | None, quarantine: Path) -> None:
    """Stream the raw table row group by row group: rows with a reason to `quarantine` (with `_row` and `_reason`),
    the others to `out` (when given; else the input's copy is already there)."""
    clean_writer = bad_writer = None
    offset = 0
    schema = pq.read_schema(files[0])
    bad_schema = schema.append(pa.field("_row", pa.int64())).append(pa.field("_reason", pa.string()))
    try:
        bad_writer = pq.ParquetWriter(quarantine, bad_schema)
        clean_writer = pq.ParquetWriter(out, schema) if out is not None else None
        for f in files:
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g)
                rows = np.arange(offset, offset + table.num_rows)
                offset += table.num_rows
                bad = np.isin(rows, list(reasons)) if reasons else np.zeros(len(rows), dtype=bool)
                if bad.any():
                    picked = table.filter(pa.array(bad))
                    extra = [pa.array(rows[bad], pa.int64()), pa.array([reasons[int(r)] for r in rows[bad]], pa.string())]
                    bad_writer.write_table(pa.Table.from_arrays(picked.columns + extra, schema=bad_schema))
                if clean_writer is not None:
                    clean_writer.write_table(table.filter(pa.array(~bad)))
    finally:
        for w in (clean_writer, bad_writer):
            if w is not None:
                w.close()
