"""The `batch-predict` Prefect flow: score a file with a model package (tasks/predict.py), from the UI or a schedule.

Run: trainflow predict PACKAGE INPUT OUTPUT --flow, python -m flows.predict PACKAGE INPUT OUTPUT, or trigger
the deployment with those parameters.
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks.errors import UserError
from tasks.predict import predict_file


@flow(name="batch-predict", log_prints=True)
def batch_predict(
    package: str = "models/production",
    input: str = "data/features/test_raw",
    output: str = "predictions/predictions.parquet",
    rejects: str = "",
) -> dict:
    """Validate INPUT with the package's suite, predict the good rows, set the others aside with reasons.
    `rejects`: where the rejected rows go; empty: OUTPUT's name + .rejects."""
    from prefect.artifacts import create_markdown_artifact

    from flows.report import table

    predict = task(name="predict", cache_policy=NO_CACHE)(predict_file)
    out = predict(package, input, output, rejects or None)
    unseen = (
        table([{"categorical column": c, "values never seen in training": n} for c, n in out["unseen_categories"].items()])
        if out["unseen_categories"]
        else "(no categorical columns)"
    )
    create_markdown_artifact(
        key="batch-predict",
        description="Rows scored and rejected",
        markdown=f"""# Batch prediction

**{out["rows"]:,} rows** from `{input}` with `{package}`: **{out["predicted"]:,} predicted** → `{out["output"]}`,
**{out["rejected"]:,} rejected** (with reasons) → `{out["rejects"]}`.
{out["seconds"]:.1f} s ({out["rows_per_s"]:,.0f} rows/s, {out["mode"]}).

Categories never seen in training are scored with the out-of-vocabulary code:

{unseen}
""",
    )
    print(f"{out['predicted']:,} predicted, {out['rejected']:,} rejected of {out['rows']:,} rows")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m flows.predict",
        description="Batch prediction as a Prefect flow run: " + (batch_predict.description or "").split("\n")[0],
    )
    ap.add_argument("package", help="package directory or .tar.gz (e.g. models/production)")
    ap.add_argument("input", help="CSV or Parquet file, or a directory of Parquet files")
    ap.add_argument("output", help="predictions: a .parquet or .csv file")
    ap.add_argument("--rejects", default="", help="rows that failed validation (default: OUTPUT's name + .rejects)")
    a = ap.parse_args(argv)
    from flows.server import prefect_api, telemetry_off

    telemetry_off()
    try:
        with prefect_api():
            batch_predict(a.package, a.input, a.output, a.rejects)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
