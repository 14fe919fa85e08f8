"""Check the raw data against its expectation suite with Great Expectations.  Run: python -m tasks.validate

The suite is a small reviewed YAML file (data/suites/*.yaml) built into a GX suite here. The reports
(JSON, markdown) are always written; on failure the stage raises with each failed expectation, its column,
how many rows broke it and a few sample values with their row numbers, so no later stage runs on bad data.
With validate.on_failure=quarantine, rows that break row-level expectations go to validate.quarantine
with their reasons instead. Accepted data is compared with the statistics of the last accepted data of the
same dataset (drift, tasks/validation/drift.py), then written to validate.out (what preprocess reads) and
becomes that dataset's entry of the reference file (tasks/validation/reference.py).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from tasks.cluster import dask_client
from tasks.errors import UserError
from tasks.files import copy_and_hash, remove, sha256_path, staged_path
from tasks.settings import Settings, cli
from tasks.tables import count_rows, parquet_files
from tasks.validation.direct import needs_gx
from tasks.validation.drift import describe, psi_unchecked
from tasks.validation.inmemory import Drift, InMemory
from tasks.validation.reference import dataset_key, read_reference, write_reference
from tasks.validation.report import ROW_LEVEL, drift_skipped, failure_message, row_reasons, write_reports
from tasks.validation.suite import import_gx, load_suite

log = logging.getLogger(__name__)


def validate(s: Settings) -> dict:
    if s.dataset.modality == "image":  # every image decoded and checked (tasks/images/validate.py)
        from tasks.images.validate import validate_images

        return validate_images(s)
    cfg = s.validate_
    suite = load_suite(s.dataset.suite)
    raw = Path(s.ingest.out)
    if not raw.exists():
        raise UserError(f"validate: {raw} does not exist; run the ingest stage first (python -m tasks.ingest)")
    files = parquet_files(raw)
    try:
        n_rows = count_rows(files)
    except pa.ArrowException as e:
        raise UserError(f"validate: {raw} is not readable Parquet ({e}); rerun the ingest stage") from None
    key = dataset_key(s.dataset.name, s.dataset.target)
    columns, why = read_reference(cfg.reference, key, list(suite["columns"])) if cfg.drift != "off" else (None, "")
    drift = Drift(columns, cfg.drift_max_mean_shift, cfg.drift_max_psi, key, why)
    partitioned = raw.is_dir() or n_rows > cfg.in_memory_max_rows
    # beside the checks, one read of the input copies it to the staged output (what is accepted when no
    # row is quarantined) and hashes it; GX is imported while the data is read if this process runs GX
    # (partitions whose columns direct.py checks exactly need no GX)
    with staged_path(cfg.out) as out, ThreadPoolExecutor(2) as pool:
        digest = pool.submit(copy_and_hash, raw, out)
        if not partitioned or (s.dask.address == "local" and not s.dask.processes and needs_gx(files, suite)):
            pool.submit(import_gx)
        if partitioned:
            from tasks.validation.partitioned import Partitioned

            with dask_client(s.dask, "validate") as client:
                return check_and_write(
                    cfg,
                    s.dataset.suite,
                    suite,
                    raw,
                    n_rows,
                    out,
                    digest,
                    Partitioned(client, files, suite, cfg.partition_rows, drift),
                )
        return check_and_write(cfg, s.dataset.suite, suite, raw, n_rows, out, digest, InMemory(files, suite, drift))


def check_and_write(cfg, suite_path: str, suite: dict, raw: Path, n_rows: int, out: Path, digest: Future, engine) -> dict:
    """Check with `engine` (in memory, or per Dask partition), decide, report, and write what was accepted."""
    results, text = engine.check()
    failed = [r for r in results if not r["success"]]

    # quarantine: row-level failures move aside; table-level ones (columns, types, row count) always stop
    table_level = [f for f in failed if f["expectation"] not in ROW_LEVEL or "error" in f]
    quarantining = cfg.on_failure == "quarantine" and bool(failed) and not table_level
    reasons = row_reasons(failed) if quarantining else pd.Series(dtype=object)
    n_clean = n_rows - len(reasons)
    enough = n_clean >= cfg.min_clean_fraction * n_rows
    success = not failed or (quarantining and enough)

    reference = Path(cfg.reference)
    report = new_report(cfg, suite_path, raw, n_rows, n_clean, digest, engine, results, failed, success)
    if failed and not success:
        write_reports(cfg, report)
        head = f"validate: {raw} failed {len(failed)} of {len(results)} expectations of {suite_path}"
        if quarantining:
            head = (
                f"validate: only {n_clean:,} of {n_rows:,} rows of {raw} pass ({n_clean / n_rows:.1%}), "
                f"fewer than validate.min_clean_fraction={cfg.min_clean_fraction}"
            )
        raise UserError(failure_message(head, results, failed, text, suite, cfg.report))

    # accepted: the clean rows, the quarantined rows and the new reference are staged, then checked for drift
    with staged_path(cfg.quarantine) as quarantine:
        if len(reasons):
            remove(out)  # the copy of the input
        engine.write(out, reasons).to_parquet(quarantine, index=False)
        stats, drifted = engine.summarize(out)
        report["drift"]["columns"] = drifted
        if drifted:
            lines = "\n".join(describe(c, d, cfg.drift_max_mean_shift, cfg.drift_max_psi) for c, d in drifted.items())
            message = (
                f"validate: {raw} drifted from the last accepted data of {engine.drift.key} ({reference}):\n{lines}\n"
                f"Full report: {cfg.report_md}."
            )
            if cfg.drift == "fail":
                report["success"] = False
                write_reports(cfg, report)
                raise UserError(
                    f"{message} If the change is expected, accept it with one run at validate.drift: warn "
                    "(e.g. dvc exp run -S validate.drift=warn), which makes this data the new reference"
                )
            log.warning(message)
        report["validated"] = {"path": cfg.out, "sha256": sha256_path(out) if len(reasons) else report["data"]["sha256"]}
    write_reports(cfg, report)
    write_reference(reference, engine.drift.key, {"data_sha256": report["data"]["sha256"], "rows": n_clean, "columns": stats})
    if len(reasons):
        log.warning("validate: quarantined %d of %d rows (%s)", len(reasons), n_rows, cfg.quarantine)
    return {k: report[k] for k in ("success", "evaluated", "passed", "pass_rate", "rows", "checked")} | {"drift": drifted}


def new_report(
    cfg, suite_path: str, raw: Path, n_rows: int, n_clean: int, digest: Future, engine, results: list, failed: list, success: bool
) -> dict[str, Any]:
    """The report of this validation (JSON; the markdown renders it): every expectation, counts, drift."""
    reference, drift = Path(cfg.reference), engine.drift
    check_drift = success and drift.reference is not None
    return {
        "success": success,
        "data": {"path": str(raw), "sha256": digest.result(), "rows": n_rows},
        "rows": {"input": n_rows, "clean": n_clean, "quarantined": n_rows - n_clean},
        "suite": suite_path,
        "checked": {"mode": engine.mode, "partitions": engine.partitions},
        "evaluated": len(results),
        "passed": len(results) - len(failed),
        "pass_rate": round((len(results) - len(failed)) / len(results), 6),
        "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
        "drift": {
            "checked": check_drift,
            "policy": cfg.drift,
            "reference": str(reference),
            "columns": {},
            "reason": None if check_drift else drift_skipped(cfg, success, drift.why),
            "psi_not_computed": psi_unchecked(drift.reference) if check_drift else [],
        },
    }


if __name__ == "__main__":
    cli(validate)
