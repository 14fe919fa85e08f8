"""The training-pipeline flow as real Prefect flow runs (temporary Prefect server) in a git + DVC workspace."""

import json
import re
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.pipeline import stages_to_run, training_pipeline
from flows.workspace import Workspace
from tasks.files import sha256_file
from tasks.settings import UserError, load_settings
from tests.conftest import ROOT, STAGES, load_package, make_repo, real_slice, sh

pytestmark = pytest.mark.slow  # real clusters, servers, flows or several ranks: `make test-fast` skips them


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("flowrepo"), world_size=2)


@pytest.fixture
def in_repo(repo, monkeypatch, prefect_server):
    monkeypatch.chdir(repo)
    return repo


def run(repo: Path, **parameters):
    """A flow run with these form parameters (partial sections: every omitted key is params.yaml's)."""
    return training_pipeline(**parameters, return_state=True)


def load_settings_text(text: str):
    from tasks.settings import parse_settings

    return parse_settings(yaml.safe_load(text))


def task_states(state) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


def logs(state) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return [entry.message for entry in found]


def artifacts(state) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    return {a.key: a for a in found}


def test_first_run_runs_every_stage_and_leaves_dvc_clean(in_repo):
    state = run(in_repo)
    assert state.is_completed()
    out = state.result()
    assert {k: v["status"] for k, v in out["stages"].items()} == {s: "ran" for s in STAGES}
    assert task_states(state) == {s: "Completed" for s in STAGES}
    assert 0 < out["metrics"]["rmse"] < 0.9 and out["experiment"] is None and out["changed_params"] == {}
    assert load_package(in_repo / "models/package").manifest["training"]["world_size"] == 2  # 2 DDP ranks
    # DVC recorded everything: dvc.lock has every stage, `dvc status` is clean, `dvc repro` has nothing to do
    assert list(yaml.safe_load((in_repo / "dvc.lock").read_text())["stages"]) == STAGES
    assert out["data_version"] == yaml.safe_load((in_repo / "dvc.lock").read_text())["stages"]["ingest"]["outs"][0]["md5"]
    assert json.loads(sh(in_repo, "dvc", "status", "--json").stdout) == {}
    assert "Data and pipelines are up to date." in sh(in_repo, "dvc", "repro").stdout
    # artifacts for the UI
    arts = artifacts(state)
    assert set(arts) == {"training-summary", "metrics", "validation-report", "training-epochs", "training-progress", "iteration"}
    # where the loop's seconds went: every stage ran, its work and start-up apart, DVC's bookkeeping as overhead
    it = json.loads((in_repo / "reports/iteration.timeline.json").read_text())
    assert it["runner"] == "flow" and it["ran"] == STAGES and it["wall_s"] >= it["work_s"] > 0
    assert set(it["overhead"]) >= {"dvc status", "dvc commit"} and it["stages"]["train"]["samples_per_s"] > 0
    assert it["stages"]["preprocess"]["rows"] == 2064 and it["stages"]["train"]["split_s"]["sync"] > 0
    spans = {(p["stage"], p["phase"]) for p in it["timeline"]}
    assert {("train", "epochs"), ("train", "imports"), ("preprocess", "cluster start"), ("runner", "dvc commit")} <= spans
    totals = {"loop_s": it["wall_s"], "work_s": it["work_s"], "useful": it["useful_fraction"]}
    assert json.loads((in_repo / "reports/iteration.json").read_text()) == totals
    assert (in_repo / "reports/iteration.png").read_bytes()[:4] == b"\x89PNG"
    shown = arts["iteration"].data
    assert "| train | ran |" in shown and "![timeline of the loop](data:image/png;base64," in shown
    epochs = json.loads(arts["training-epochs"].data)  # one run's epochs, reduced over its 2 ranks
    assert [e["epoch"] for e in epochs] == list(range(1, out["training"]["epochs_run"] + 1))
    assert all(e["sync_s"] > 0 and e["compute_s"] > 0 and e["samples_per_s"] > 0 for e in epochs)
    assert float(arts["training-progress"].data) == 100.0  # followed epoch by epoch, ended full
    assert out["training"]["world_size"] == 2 and set(out["training"]["time_split_s"]) == {"data", "compute", "sync"}
    assert arts["validation-report"].data.startswith("# Validation PASSED: 29 of 29")
    summary = arts["training-summary"].data
    assert summary.startswith("# Trainflow run: promoted\n") and "2 rank(s) (local, ddp, fp32 on cpu)" in summary
    assert re.search(r"Time per step: [\d.]+ ms data · [\d.]+ ms compute · [\d.]+ ms sync \(whole run: ", summary)
    assert re.search(r"\| train +\| ran +\|", summary) and out["data_version"] in summary
    assert "![learning curves](data:image/png;base64,iVBOR" in summary  # the PNG, inline
    assert [row["metric"] for row in json.loads(arts["metrics"].data)] == ["RMSE", "MAE", "R²", "MAPE"]
    # the first model beat the train-mean baseline: promoted to evaluate.champion, and the flow says so
    assert out["gate"]["decision"] == "promote" and "**Gate:** promote: test RMSE" in summary
    # live progress: a line per epoch in the train task's log
    lines = [m for m in logs(state) if m.startswith("train: epoch ")]
    assert len(lines) == out["training"]["epochs_run"] and all("val RMSE" in m and "ETA" in m for m in lines), lines
    assert load_package(in_repo / "models/production").manifest == load_package(in_repo / "models/package").manifest


def test_rerun_with_nothing_changed_skips_every_stage(in_repo):
    before = sha256_file(in_repo / "models/train/model.pt")
    state = run(in_repo)
    out = state.result()
    assert {k: v["status"] for k, v in out["stages"].items()} == {s: "cached" for s in STAGES}
    assert task_states(state) == {s: "Cached" for s in STAGES}
    assert sha256_file(in_repo / "models/train/model.pt") == before
    assert out["metrics"] == out["previous_metrics"]
    # an honest summary: nothing ran, the outputs are the first run's, and no stale training figures or gate
    assert state.name == "Completed"
    arts = artifacts(state)
    made_by = load_package(in_repo / "models/package").manifest["prefect_flow_run_id"]
    assert arts["training-summary"].data.startswith(f"# Nothing changed: reused Prefect flow run `{made_by}`")
    assert "training-epochs" not in arts and "**Gate:**" not in arts["training-summary"].data
    it = json.loads((in_repo / "reports/iteration.timeline.json").read_text())
    assert it["ran"] == [] and it["work_s"] == 0 and it["overhead"]["dvc status"] > 0  # all of it overhead
    assert it["process"]["warm"] is False and "**Warm process:**" not in arts["iteration"].data  # (not a served run)
    assert f"**Reused, up to date in DVC:** {', '.join(STAGES)} (their" in arts["iteration"].data


def test_while_the_server_starts_a_run_imports_only_what_its_stages_will_need(in_repo):
    """`trainflow run` imports stage modules while the local server starts: none for a run with nothing to do;
    from the first stage DVC finds changed on (a train.* value: train, evaluate, package, promote)."""
    assert stages_to_run() == []
    text = (in_repo / "params.yaml").read_text()
    (in_repo / "params.yaml").write_text(text.replace("epochs: 3", "epochs: 2", 1))
    try:
        assert stages_to_run() == ["train", "evaluate", "package", "promote"]
    finally:
        (in_repo / "params.yaml").write_text(text)
    assert stages_to_run() == []


def test_train_param_from_the_ui_runs_as_a_dvc_experiment(in_repo):
    params_before = (in_repo / "params.yaml").read_bytes()
    model_before = sha256_file(in_repo / "models/train/model.pt")
    champion_before = sha256_file(in_repo / "models/production/manifest.json")
    state = run(in_repo, train={"epochs": 1})
    out = state.result()
    assert {k: v["status"] for k, v in out["stages"].items()} == {
        "ingest": "cached",
        "validate": "cached",
        "preprocess": "cached",
        "train": "ran",
        "evaluate": "ran",
        "package": "ran",
        "promote": "ran",
    }
    assert out["changed_params"] == {"train.epochs": [3, 1]} or out["changed_params"] == {"train.epochs": (3, 1)}
    # 1 epoch loses to the workspace's champion (3 epochs): the run completes as "Not promoted", naming the margin
    assert state.is_completed() and state.name == "Not promoted"
    assert state.message == out["gate"]["message"]
    assert (
        state.message.startswith("not promoted: test RMSE ") and f"vs champion {in_repo / 'models/production'} " in state.message
    )
    assert sha256_file(in_repo / "models/production/manifest.json") == champion_before
    exp = out["experiment"]
    assert exp and exp.startswith("prefect-")
    # the workspace is as it was: params.yaml, model, and DVC's view of it
    assert (in_repo / "params.yaml").read_bytes() == params_before
    assert sha256_file(in_repo / "models/train/model.pt") == model_before
    assert json.loads(sh(in_repo, "dvc", "status", "--json").stdout) == {}
    # DVC lists the experiment with the parameter used and its metrics
    shown = json.loads(sh(in_repo, "dvc", "exp", "show", "--json").stdout)
    exps = {e["name"]: e for base in shown for e in (base.get("experiments") or [])}
    data = exps[exp]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["epochs"] == 1
    assert data["metrics"]["reports/evaluate/metrics.json"]["data"]["rmse"] == pytest.approx(out["metrics"]["rmse"])
    assert "`train.epochs`: 3 → 1" in artifacts(state)["training-summary"].data
    # the experiment's params.yaml is the user's file with that one value changed: comments, ints, relative paths kept
    theirs = sh(in_repo, "git", "show", f"{exps[exp]['revs'][0]['rev']}:params.yaml").stdout
    assert theirs == (in_repo / "params.yaml").read_text().replace("epochs: 3", "epochs: 1", 1)
    assert "# Trainflow's one config file" in theirs and re.search(r"step_timeout_s: 600\s", theirs) and "600.0" not in theirs
    assert re.search(r"champion: models/production\s", theirs)  # relative, as the user wrote it (no path of this machine)
    diff = json.loads(sh(in_repo, "dvc", "exp", "diff", exp, "--json").stdout)["params"]["params.yaml"]
    assert diff == {"train.epochs": {"old": 3, "new": 1}} or set(diff) == {"train.epochs"}
    # `dvc exp branch` makes it a branch whose dvc.lock names the experiment's model, kept in the DVC cache
    sh(in_repo, "dvc", "exp", "branch", exp, "one-epoch")
    lock = yaml.safe_load(sh(in_repo, "git", "show", "one-epoch:dvc.lock").stdout)
    model = next(o for o in lock["stages"]["train"]["outs"] if o["path"].endswith("models/train"))["md5"]
    assert model != next(o for o in yaml.safe_load((in_repo / "dvc.lock").read_text())["stages"]["train"]["outs"])["md5"]
    assert (in_repo / ".dvc/cache/files/md5" / model[:2] / model[2:]).is_file()


def test_a_run_named_like_a_path_is_never_used_as_one(in_repo):
    """The audit's attack: a run named `x/../../../../data` used to rmtree data/ through its experiment path."""
    data_before = {p: sha256_file(p) for p in (in_repo / "data").rglob("*") if p.is_file()}
    state = training_pipeline.with_options(flow_run_name="x/../../../../data")(
        evaluate={"min_improvement": 0.5}, return_state=True
    )  # differs from params.yaml: an experiment
    assert state.is_completed(), state.message
    name = state.result()["experiment"]
    assert name.startswith("prefect-x-data-") and len(name) == len("prefect-x-data-") + 8
    assert {p: sha256_file(p) for p in (in_repo / "data").rglob("*") if p.is_file()} == data_before
    shown = json.loads(sh(in_repo, "dvc", "exp", "show", "--json").stdout)
    assert name in {e["name"] for base in shown for e in (base.get("experiments") or [])}
    assert not any((in_repo / ".dvc/tmp/trainflow-exps").iterdir())  # its worktree (named by the run's id) is gone


def test_output_paths_that_overlap_are_refused_before_anything_runs(in_repo):
    """Output paths are not run parameters at all; in params.yaml they are checked before any stage runs."""
    from prefect.exceptions import ParameterBindError

    with pytest.raises(ParameterBindError, match="unexpected keyword argument 'package'"):
        run(in_repo, package={"out_dir": "data"})
    good = (in_repo / "params.yaml").read_text()
    before = {p: sha256_file(p) for p in (in_repo / "data").rglob("*") if p.is_file()}
    (in_repo / "params.yaml").write_text(good.replace("out_dir: models/package", "out_dir: data"))
    try:
        state = run(in_repo)
    finally:
        (in_repo / "params.yaml").write_text(good)
    assert state.is_failed()
    assert "ingest.out and package.out_dir overlap" in str(state.result(raise_on_failure=False))
    assert task_states(state) == {}  # no stage started
    assert {p: sha256_file(p) for p in (in_repo / "data").rglob("*") if p.is_file()} == before


def test_push_without_a_remote_names_the_fix(in_repo):
    state = run(in_repo, advanced={"dvc": {"push": True}})
    assert state.is_failed()
    assert "no default DVC remote; add one with `dvc remote add -d" in str(state.result(raise_on_failure=False))
    assert json.loads(sh(in_repo, "dvc", "status", "--json").stdout) == {}  # the run itself is recorded


def test_push_sends_data_and_models_to_the_remote(in_repo, tmp_path):
    sh(in_repo, "dvc", "remote", "add", "--local", "-d", "storage", str(tmp_path / "remote"))
    try:
        out = run(in_repo, advanced={"dvc": {"push": True}}).result()
        assert out["experiment"] is None  # dvc.* and dask.* choose how a run executes, not what it computes
        assert json.loads(sh(in_repo, "dvc", "status", "--cloud", "--json").stdout) == {}
        assert sum(1 for p in (tmp_path / "remote").rglob("*") if p.is_file()) > 10
    finally:
        sh(in_repo, "dvc", "remote", "remove", "--local", "storage")


def test_params_yaml_made_invalid_between_runs_is_named(in_repo):
    good = (in_repo / "params.yaml").read_text()
    (in_repo / "params.yaml").write_text(good.replace("lr: 0.01", "lr: -0.01"))
    try:
        state = run(in_repo)  # an unchanged form: params.yaml as it is now
        assert state.is_failed()
        assert "params.yaml: train.lr = -0.01: Input should be greater than 0" in str(state.result(raise_on_failure=False))
    finally:
        (in_repo / "params.yaml").write_text(good)


def test_a_second_run_on_a_busy_workspace_fails_fast(in_repo):
    with Workspace(in_repo).locked():
        state = run(in_repo)
        assert state.is_failed()
        assert "is busy: another Trainflow run or DVC command holds its lock" in str(state.result(raise_on_failure=False))
        assert sh(in_repo, "dvc", "repro", check=False).returncode != 0  # and DVC itself waits for us too


def test_bad_data_stops_before_preprocess_and_keeps_the_last_model(in_repo):
    frame = real_slice()
    frame.loc[[1, 2, 3], "AveRooms"] = -1.0
    frame.to_parquet(in_repo / "data/sources/slice.parquet", index=False)
    features = sorted((in_repo / "data/features/train").glob("part-*.parquet"))
    assert features
    kept = {p: sha256_file(p) for p in (in_repo / "models/train/model.pt", in_repo / "models/package/model.onnx", *features)}
    state = run(in_repo)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, UserError) and "column AveRooms: 3 rows" in str(error)
    assert task_states(state) == {"ingest": "Completed", "validate": "Failed"}
    assert {p: sha256_file(p) for p in kept} == kept
    report = artifacts(state)["validation-report"].data
    assert (
        report.startswith("# Validation FAILED: 28 of 29")
        and "| FAIL | expect_column_values_to_be_between | AveRooms | between 0.0 and 1000.0 | 3 rows unexpected" in report
    )


def test_unreachable_prefect_api_is_named_with_the_fix(tmp_path):
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    env = dict(os.environ, PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    proc = sh(ROOT, sys.executable, "-m", "flows.pipeline", check=False, env=env, timeout=120)
    assert proc.returncode == 2
    assert f"PREFECT_API_URL=http://127.0.0.1:{port}/api does not answer" in proc.stderr and "prefect server start" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_server_named_by_the_active_prefect_profile_is_used_and_none_is_started(tmp_path):
    """`trainflow run` starts the local server before it imports Prefect (flows/server.start_early): a server
    named only in Prefect's profile must still be the one used, and no local server started beside it."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    home = tmp_path / "home"
    home.mkdir()
    (home / "profiles.toml").write_text(f'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "http://127.0.0.1:{port}/api"\n')
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(home), "TRAINFLOW_PREFECT_SERVER": "local"}
    proc = sh(ROOT, sys.executable, "-m", "flows.pipeline", check=False, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"PREFECT_API_URL=http://127.0.0.1:{port}/api does not answer" in proc.stderr
    assert not (home / "trainflow-server.log").exists() and not (home / "trainflow-server.json").exists()


def test_a_flow_killed_during_training_resumes_from_its_checkpoint(tmp_path):
    """SIGKILL the flow process itself mid-training (`python -m flows.pipeline`); the next run skips the stages
    that finished and continues training from the checkpoint instead of from scratch."""
    import os
    import signal
    import subprocess

    from tasks.train import train
    from tests.conftest import parse, same_parameters
    from tests.harness import fault

    repo = make_repo(tmp_path / "repo", epochs=3, checkpoint_every="4 steps")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        **fault(f"kill:0:25:{tmp_path / 'fired'}"),
    }
    with open(tmp_path / "killed.log", "w") as log:  # a file, not a pipe: the dead flow's server child keeps its pipes
        flow = subprocess.Popen(
            [sys.executable, "-m", "flows.pipeline"], cwd=repo, env=env, stdout=log, stderr=log, start_new_session=True
        )
        try:
            assert flow.wait(timeout=600) == -signal.SIGKILL
            # its temporary Prefect server, left without a parent, is stopped by the flow's reaper process
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and left_in_group(flow.pid):
                time.sleep(0.2)
            assert not left_in_group(flow.pid), "the killed flow's temporary Prefect server is still running"
        finally:
            try:
                os.killpg(flow.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert (tmp_path / "fired").exists() and not (repo / "models/train/model.pt").exists()
    again = sh(repo, sys.executable, "-m", "flows.pipeline", env=env)  # the fault fires once
    assert "stages: ingest cached" in again.stdout and "preprocess cached" in again.stdout
    summary = json.loads((repo / "models/train/summary.json").read_text())
    assert summary["resumed_from"] is not None and 0 < summary["resumed_from"]["steps"] <= 25
    # the parameters of training the same features without interruption
    raw = load_settings(repo / "params.yaml").model_dump(by_alias=True)
    raw["preprocess"]["out_dir"] = str(repo / raw["preprocess"]["out_dir"])
    raw["train"].update(out_dir=str(tmp_path / "ref/model"), log_dir=str(tmp_path / "ref/live"))
    train(parse(raw))
    same_parameters(tmp_path / "ref/model", repo / "models/train", atol=1e-6)


def left_in_group(pgid: int) -> bool:
    """Whether any process of the process group pgid is still running (zombies do not count)."""
    import os

    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z" and int(proc.name) != os.getpid():
                return True
    return False


def test_a_user_error_in_a_stage_is_said_once_without_a_traceback(tmp_path):
    """`trainflow run` (python -m flows.pipeline) on params a stage refuses: exit 2 and the message once, as the
    stage CLIs say it; the Prefect run still records the failure with the message."""
    from tasks.settings import edit_params

    repo = make_repo(tmp_path / "repo")
    params = repo / "params.yaml"
    params.write_text(edit_params(params.read_text(), {"dataset.task": "binary", "evaluate.primary": "roc_auc"}))
    proc = sh(repo, sys.executable, "-m", "flows.pipeline", check=False, timeout=300)
    message = "dataset.task=binary: 'MedHouseVal' has"
    assert proc.returncode == 2, proc.stderr
    assert (proc.stdout + proc.stderr).count(message) == 1 and f"error: {message}" in proc.stderr
    assert "set dataset.task: multiclass" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
