"""The `batch-predict` Prefect flow: score a file with a model package (tasks/predict.py), from the UI or a schedule.

Run: python -m flows.predict PACKAGE INPUT OUTPUT   (or trigger the deployment with those parameters)
"""

import os
import sys

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from tasks.predict import predict_file  # noqa: E402
from tasks.settings import UserError  # noqa: E402


@flow(name="batch-predict", log_prints=True)
def batch_predict(package: str = "models/production", input: str = "data/features/test_raw",
                  output: str = "predictions/predictions.parquet", rejects: str | None = None) -> dict:
    """Validate INPUT with the package's suite, predict the good rows, set the others aside with reasons."""
    out = task(predict_file, name="predict", cache_policy=NO_CACHE)(package, input, output, rejects)
    unseen = "\n".join(f"| {c} | {n:,} |" for c, n in out["unseen_categories"].items()) or "| (no categorical columns) | |"
    create_markdown_artifact(key="batch-predict", description="Rows scored and rejected", markdown=f"""# Batch prediction

**{out['rows']:,} rows** from `{input}` with `{package}`: **{out['predicted']:,} predicted** → `{out['output']}`,
**{out['rejected']:,} rejected** (with reasons) → `{out['rejects']}`. {out['seconds']:.1f} s ({out['rows_per_s']:,.0f} rows/s, {out['mode']}).

| categorical column | values never seen in training (scored with the out-of-vocabulary code) |
|---|---|
{unseen}
""")
    print(f"{out['predicted']:,} predicted, {out['rejected']:,} rejected of {out['rows']:,} rows")
    return out


if __name__ == "__main__":
    try:
        from flows.pipeline import check_api

        check_api()
        batch_predict(*sys.argv[1:4])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
