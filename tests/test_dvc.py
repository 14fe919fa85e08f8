"""`dvc repro` end to end in a temporary git + DVC copy of the project."""

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import STAGES, make_repo, sh

pytestmark = pytest.mark.slow  # real clusters, servers, flows or several ranks: `make test-fast` skips them


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("repo"))


def test_repro_runs_every_stage_then_is_a_no_op(repo):
    sh(repo, "dvc", "repro")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES
    metrics = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert 0 < metrics["rmse"] < 0.9
    assert (repo / "models/package/model.onnx").exists()
    assert (repo / ".dvc/cache").exists()  # outputs are in the DVC cache
    assert (repo / "models/production/manifest.json").exists()  # the first model beat the train mean: promoted
    # each stage's command recorded its part; the report is whole after the last one: DVC's time between them
    it = json.loads((repo / "reports/iteration.timeline.json").read_text())
    assert it["runner"] == "dvc repro" and it["ran"] == STAGES and it["overhead"]["dvc"] > 0
    assert all(it["stages"][s]["startup_s"] > 0 for s in STAGES)  # a fresh process each: its imports
    assert it["wall_s"] == pytest.approx(it["work_s"] + it["overhead_s"], abs=0.01) and it["work_s"] > 0
    stamp = (repo / "reports/iteration.json").read_text()

    again = sh(repo, "dvc", "repro")
    assert "Data and pipelines are up to date." in again.stdout
    for stage in STAGES:
        assert f"Running stage '{stage}'" not in again.stdout
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}
    assert (repo / "reports/iteration.json").read_text() == stamp  # nothing ran: the last loop's report stays


def test_changing_a_train_param_reruns_only_downstream_stages(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first model")
    out = sh(repo, "dvc", "repro").stdout
    ran = [s for s in STAGES if f"Running stage '{s}'" in out]
    assert ran == ["train", "evaluate", "package", "promote"]
    assert json.loads((repo / "models/train/summary.json").read_text())["epochs_run"] == 2
    assert "not promoted: test RMSE " in out  # 2 epochs lose to the 3-epoch champion
    # against the last commit: the metrics and the plots
    diff = json.loads(sh(repo, "dvc", "metrics", "diff", "--json").stdout)["reports/evaluate/metrics.json"]
    assert diff["rmse"]["diff"] > 0 and diff["promote"] == {"old": 1, "new": 0, "diff": -1}
    plots = json.loads(sh(repo, "dvc", "plots", "diff", "--json").stdout)["data"]
    assert list(plots)[:3] == [
        "Test split, predicted vs actual (regression scatter; classification confusion matrix)",
        "Residuals (test split)",
        "Loss per epoch, train and validation (regression MSE of the standardised target; classification log-loss)",
    ]
    figures = [p for p in plots if p.startswith("reports/evaluate/figures/")]  # every file there a figure
    assert figures == [f"reports/evaluate/figures/{n}.png" for n in ("learning_curve", "pred_vs_actual", "residuals")]
    assert list(plots)[-2:] == ["Training speed per epoch (samples/s)", "reports/iteration.png"]  # quality first, time last
    assert set(plots["Residuals (test split)"][0]["revisions"]) == {"HEAD", "workspace"}  # side by side


def test_dvc_views_are_readable(repo, tmp_path):
    """`dvc metrics show` holds the numbers a person compares; `dvc plots show` renders offline, every chart
    (checked in headless Chromium with the network cut); the residuals are a histogram on a numeric axis."""
    from tests.harness import browser

    shown = sh(repo, "dvc", "metrics", "show", "--json").stdout
    files = json.loads(shown)[""]["data"]
    assert set(files) == {"reports/train/metrics.json", "reports/evaluate/metrics.json", "reports/iteration.json"}
    columns = {k for f in files.values() for k in f["data"]}  # (not the validation report)
    loop = {"loop_s", "work_s", "useful"}  # where the loop's seconds went
    assert columns == {"train", "val", "lr", "perf", "step", "rmse", "mae", "r2", "mape", "n", "promote", "improvement"} | loop
    width = max(len(line) for line in sh(repo, "dvc", "metrics", "show").stdout.splitlines())
    assert width < 220, width
    sh(repo, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots/index.html").read_text()
    assert "cdn.jsdelivr" not in html and "vegaEmbed" in html
    pw, chromium = browser()
    try:
        context = chromium.new_context()
        requested = []
        context.route(
            "**/*",
            lambda route: (
                route.continue_()
                if route.request.url.startswith("file:")
                else (requested.append(route.request.url), route.abort())
            ),
        )
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"file://{tmp_path / 'plots/index.html'}")
        page.wait_for_timeout(2000)
        charts = page.locator("svg.marks, canvas.marks").count()
        images = page.locator("img").count()
        page.screenshot(path=tmp_path / "plots.png", full_page=True)
    finally:
        chromium.close()
        pw.stop()
    assert (charts, images, requested, errors) == (7, 4, [], [])  # 7 Vega charts; 3 figures + the loop timeline
    template = json.loads((repo / ".dvc/plots/histogram.json").read_text())
    assert template["encoding"]["x"]["type"] == "quantitative" and template["encoding"]["x2"]["field"] == "<DVC_METRIC_X>_to"
