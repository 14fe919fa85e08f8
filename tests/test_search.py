"""Hyperparameter search: a real Optuna study whose trials train on a real Dask LocalCluster, on the real
California Housing slice; bad search spaces through the real CLI; the flow killed mid-study and resumed in a git
+ DVC repo, its trials listed by `dvc exp show`, and the best trial applied to params.yaml."""

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.settings import edit_params
from tests.conftest import ROOT, make_repo, parse, sh

TRAINFLOW = str(Path(sys.executable).with_name("trainflow"))


@pytest.mark.parametrize(
    "space,expected",
    [
        ({"train.lrr": {"type": "float", "low": 0.001, "high": 0.01}}, "unknown key 'train.lrr': did you mean train.lr"),
        ({"train.lr": {"type": "float", "low": 0.01, "high": 0.01}}, "search.space.train.lr: empty range"),
        (
            {"train.batch_size": {"type": "categorical", "choices": [256]}},
            "search.space.train.batch_size: categorical choices=[256]",
        ),
        ({"train.weight_decay": {"type": "float", "low": 0, "high": 0.1, "log": True}}, "log scale needs low > 0"),
        ({"train.out_dir": {"type": "categorical", "choices": ["a", "b"]}}, "train.out_dir is not tunable"),
        ({"train.dropout": {"type": "float", "low": 0.0, "high": 1.5}}, "search.space.train.dropout: 1.5 is not a valid"),
    ],
    ids=["unknown key", "empty range", "one choice", "log from 0", "a path", "out of bounds"],
)
def test_a_bad_space_is_refused_by_the_cli_naming_the_key(tmp_path, space, expected):
    (tmp_path / "params.yaml").write_text(edit_params((ROOT / "params.yaml").read_text(), {"search.space": space}))
    proc = sh(tmp_path, TRAINFLOW, "search", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: params.yaml: ") and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "data").exists()  # nothing ran


def study_settings(base, root: Path, **search):
    raw = base.model_dump(by_alias=True)
    raw["train"].update(epochs=6, patience=100)
    raw["search"].update(
        workers=1,
        storage=str(root / "search" / "study.db"),
        out_dir=str(root / "report"),
        pruner="median",
        warmup_epochs=2,
        startup_trials=1,
        space={
            "train.lr": {"type": "float", "low": 1e-5, "high": 0.05, "log": True},
            "train.batch_size": {"type": "categorical", "choices": [128, 4096]},
            "preprocess.n_quantiles": {"type": "int", "low": 10, "high": 500},
        },
    )
    raw["search"].update({"n_trials": 3, **search})
    return parse(raw)


@pytest.mark.slow
def test_trials_train_are_pruned_and_fail_and_the_study_goes_on(features, tmp_path):
    """Three trials, one worker, in order: a good one completes; one with a tiny learning rate is pruned after
    the warm-up (its training stopped there); one whose batch cannot fit the training rows fails with that
    error, and the study still finishes. Each trial preprocessed its own features (preprocess.n_quantiles)."""
    from tasks.search import figures, open_study, search, trials_root

    s = study_settings(features, tmp_path)
    study = open_study(s.search)
    for lr, batch, q in [(0.01, 128, 100), (1e-5, 128, 200), (0.01, 4096, 300)]:
        study.enqueue_trial({"train.lr": lr, "train.batch_size": batch, "preprocess.n_quantiles": q})
    summary = search(s)

    trials = {t["number"]: t for t in summary["trials"]}
    assert [trials[n]["state"] for n in range(3)] == ["COMPLETE", "PRUNED", "FAIL"]
    assert trials[0]["epochs_run"] == 6 and trials[0]["value"] == summary["best"]["value"] < 1.0
    pruned = open_study(s.search, heartbeat=False).trials[1]
    assert trials[1]["epochs_run"] == len(pruned.intermediate_values) == s.search.warmup_epochs < 6  # stopped there
    assert "train.batch_size=4096" in trials[2]["error"] and "UserError" in trials[2]["error"]
    for n, q in [(0, 100), (1, 200)]:  # each trial's own features, with its own value
        transform = json.loads((trials_root(s.search) / f"trial-{n:04d}" / "features" / "transform.json").read_text())
        assert len(transform["references"]) == q
    summary2 = search(s)  # the study is complete: nothing runs again
    assert summary2["states"] == summary["states"]
    importances = figures(open_study(s.search, heartbeat=False), Path(s.search.out_dir), s.search.metric)
    assert (Path(s.search.out_dir) / "history.png").stat().st_size > 1000 and isinstance(importances, dict)


def study_states(db: Path, study: str) -> list:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:  # read only until the search has created the schema (else both would create it: a UNIQUE conflict)
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as db_:
            if not db_.execute("SELECT count(*) FROM alembic_version").fetchone()[0]:
                return []
    except sqlite3.Error:
        return []
    try:
        return optuna.load_study(study_name=study, storage=f"sqlite:///{db}").get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return []


@pytest.mark.slow
def test_a_killed_search_flow_resumes_without_losing_or_double_counting_a_trial(tmp_path):
    """`trainflow search` SIGKILLed (its process group: the flow, its Prefect server and Dask workers) while
    trials run; run again, it fails the trials left running, runs each again once, and runs only the trials still
    missing. Every complete trial is a DVC experiment; --apply writes the best values into params.yaml, and the
    next `trainflow run` trains them and the gate promotes the model (the workspace has no champion yet)."""
    repo = make_repo(tmp_path / "repo")
    n = 6
    params = repo / "params.yaml"
    params.write_text(edit_params(params.read_text(), {"search.n_trials": n, "search.warmup_epochs": 3, "train.epochs": 8}))
    sh(repo, "git", "commit", "-qam", "a small search")
    db = repo / "data/search/study.db"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", OMP_WAIT_POLICY="PASSIVE")
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(
            [TRAINFLOW, "search"], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.time() + 300
    while time.time() < deadline:
        trials = study_states(db, "california-mlp") if db.exists() else []
        if any(t.state.name == "COMPLETE" for t in trials) and any(t.state.name == "RUNNING" for t in trials):
            break
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: (t.state.name, t.value) for t in study_states(db, "california-mlp")}
    running = sorted(k for k, (state, _) in before.items() if state == "RUNNING")
    assert running

    resumed = sh(repo, TRAINFLOW, "search", env=env, timeout=600)
    assert f"trials {running} were left running by a killed search" in resumed.stdout + resumed.stderr
    after = study_states(db, "california-mlp")
    by_number = {t.number: t for t in after}
    for k, (state, value) in before.items():  # finished trials kept as they were; the killed ones failed
        assert by_number[k].state.name == ("FAIL" if state == "RUNNING" else state)
        if state != "RUNNING":
            assert by_number[k].value == value
    retries = {t.system_attrs["failed_trial"]: t for t in after if "failed_trial" in t.system_attrs}
    assert sorted(retries) == running  # each killed trial run again, once
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in retries.values())
    assert len(after) - len(running) == n  # none lost, none counted twice
    assert not [t for t in after if t.state.name in ("RUNNING", "WAITING")]

    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    exps = {r["name"]: r["data"] for b in shown for e in b.get("experiments") or [] for r in e["revs"]}
    complete = [t for t in after if t.state.name == "COMPLETE"]
    assert {f"california-mlp-trial-{t.number}" for t in complete} <= set(exps)
    best = min(complete, key=lambda t: t.value)
    exp = exps[f"california-mlp-trial-{best.number}"]
    assert exp["params"]["params.yaml"]["data"]["train"]["lr"] == best.params["train.lr"]
    assert exp["metrics"]["reports/train/metrics.json"]["data"]["val"]["rmse"] > 0
    assert (repo / "reports/search/history.png").exists() and "best trial" in (repo / "reports/search/search.md").read_text()

    sh(repo, TRAINFLOW, "search", "--apply", env=env)
    applied = yaml.safe_load(params.read_text())
    assert applied["train"]["lr"] == best.params["train.lr"] and applied["train"]["batch_size"] == best.params["train.batch_size"]
    assert params.read_text().startswith("# Trainflow's one config file")  # comments kept
    run = sh(repo, TRAINFLOW, "run", env=env, timeout=600)  # the applied config through the gate, like any run
    gate = json.loads((repo / "reports/evaluate/gate.json").read_text())
    assert gate["decision"] == "promote" and "gate:          promote" in run.stdout


def test_trials_left_running_are_failed_and_retried_once(tmp_path, features):
    """What a killed driver leaves: a trial with a heartbeat, and one killed between ask and its first heartbeat
    (which Optuna alone would never find stale). Both are failed and enqueued again once; a second recovery
    finds nothing."""
    from optuna.trial import TrialState

    from tasks.search import counted, distributions, open_study, recover

    s = study_settings(features, tmp_path, n_trials=4)
    study = open_study(s.search)
    beaten, silent = study.ask(distributions(s.search)), study.ask(distributions(s.search))
    study._storage.record_heartbeat(beaten._trial_id)
    assert recover(open_study(s.search)) == [0, 1]
    trials = open_study(s.search).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.WAITING, TrialState.WAITING]
    assert [t.params for t in trials[2:]] == [beaten.params, silent.params]  # the same values run again
    assert [t.number for t in counted(open_study(s.search))] == [2, 3]
    assert recover(open_study(s.search)) == []


@pytest.mark.slow
def test_trials_go_to_the_gpu_workers_of_an_existing_cluster(features, tmp_path):
    """dask.address set: the trials ask for a GPU resource, so they run only on the workers that declare one
    (here a CPU worker started with GPU=1), one at a time each; the worker without one runs none."""
    from distributed import Client, Nanny, Scheduler, SpecCluster, get_task_stream

    from tasks.search import search

    options = {"nthreads": 2, "host": "127.0.0.1", "dashboard_address": None}
    workers = {
        "gpu": {"cls": Nanny, "options": dict(options, resources={"GPU": 1})},
        "cpu": {"cls": Nanny, "options": options},
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": None}}
    raw = study_settings(features, tmp_path, n_trials=2, pruner="none").model_dump(by_alias=True)
    raw["search"]["space"] = {"train.lr": {"type": "float", "low": 0.005, "high": 0.02, "log": True}}
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        raw["dask"]["address"] = cluster.scheduler_address
        gpu = next(a for a, w in client.scheduler_info()["workers"].items() if w.get("resources"))
        with get_task_stream(client) as stream:
            summary = search(parse(raw))
    assert summary["states"] == {"COMPLETE": 2}
    placed = {t["key"]: t["worker"] for t in stream.data if str(t["key"]).startswith("trial-")}
    assert len(placed) == 2 and set(placed.values()) == {gpu}
