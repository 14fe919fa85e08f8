"""The command line as a person uses it, through real subprocesses: `trainflow` and every `python -m` edge.
`--help` prints help and touches nothing; a wrong option or command is a usage error (exit 2) that runs nothing."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import STAGES, copy_repo, make_repo, sh
from tests.harness import snapshot

TRAINFLOW = str(Path(sys.executable).with_name("trainflow"))
EDGES = [
    [sys.executable, "-m", m]
    for m in ["flows.pipeline", "flows.serve", "flows.predict", "flows.search"]
    + ["tasks.settings", "tasks.datasets", "tasks.predict"]
    + [f"tasks.{s}" for s in STAGES]
]
COMMANDS = [[TRAINFLOW]] + [
    [TRAINFLOW, c] for c in ("run", "server", "serve", "stage", "predict", "use", "status", "ui", "search")
]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("cli"))


def run(repo: Path, *cmd: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return sh(repo, *cmd, check=False, timeout=timeout)


@pytest.mark.parametrize(
    "cmd", EDGES + COMMANDS, ids=lambda c: " ".join(Path(c[0]).name if i == 0 else x for i, x in enumerate(c))
)
def test_help_prints_help_and_touches_nothing(repo, cmd):
    before = snapshot(repo)
    t0 = time.perf_counter()
    proc = run(repo, *cmd, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.lower().startswith("usage:") and "--help" in proc.stdout
    assert time.perf_counter() - t0 < 30  # it printed help; it did not run a stage
    assert snapshot(repo) == before


@pytest.mark.parametrize(
    "cmd",
    [
        [sys.executable, "-m", "tasks.train", "--epochs", "3"],
        [sys.executable, "-m", "flows.pipeline", "now"],
        [TRAINFLOW, "run", "--fast"],
        [TRAINFLOW, "frobnicate"],
        [TRAINFLOW, "stage", "trian"],
    ],
    ids=lambda c: " ".join(c[1:]),
)
def test_a_wrong_option_or_command_is_a_usage_error_and_runs_nothing(repo, cmd):
    before = snapshot(repo)
    proc = run(repo, *cmd)
    assert proc.returncode == 2 and "usage:" in proc.stderr.lower(), proc.stderr
    assert snapshot(repo) == before


@pytest.mark.slow
def test_stage_use_and_status(repo, reproduced, tmp_path):
    """`trainflow stage` runs one stage as `dvc repro` would; `use` switches the dataset; `status` says what
    would rerun and why."""
    out = run(repo, TRAINFLOW, "stage", "ingest")
    assert out.returncode == 0 and (repo / "data/raw/data.parquet").exists()
    status = run(repo, TRAINFLOW, "status")
    assert status.returncode == 0
    text = " ".join(status.stdout.split())
    assert "ingest │ reruns: never run (dvc.lock has no record of it)" in text  # it ran outside DVC
    assert "Champion:" in text and "none yet" in text and "no run yet" in text
    repo = copy_repo(reproduced, tmp_path / "repo")  # after `dvc repro`
    text = " ".join(run(repo, TRAINFLOW, "status").stdout.split())
    assert all(f"{s} │ up to date" in text for s in STAGES), text
    assert "Champion:" in text and "version" in text and "Last run:" in text and "gate: promote" in text
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("lr: 0.01", "lr: 0.02"))
    try:
        text = " ".join(run(repo, TRAINFLOW, "status").stdout.split())
        assert "train │ reruns: params changed: train.lr" in text and "evaluate │ reruns after train" in text, text
    finally:
        (repo / "params.yaml").write_text(params)
    switched = run(repo, TRAINFLOW, "use", "flights")
    try:
        assert switched.returncode == 0 and "params.yaml now trains on flights" in switched.stdout
        assert "name: flights" in (repo / "params.yaml").read_text()
        assert "# Trainflow's one config file" in (repo / "params.yaml").read_text()  # the rest of the file kept
    finally:
        (repo / "params.yaml").write_text(params)


@pytest.mark.slow
def test_each_dataset_keeps_its_champion_when_use_switches(reproduced, tmp_path):
    """`trainflow use` in a real DVC repo: the housing champion is kept aside while Adult (binary) trains and
    gets a champion of its own against the class prior; switching back restores the housing champion, and the
    gate compares the next housing run with it, not with Adult's."""
    import pandas as pd
    import yaml

    from tests.conftest import ROOT

    repo = copy_repo(reproduced, tmp_path / "repo")  # the housing slice promoted by `dvc repro`
    housing = (repo / "models/production").resolve()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "data/datasets").mkdir(parents=True, exist_ok=True)
    (repo / "data/datasets/housing.yaml").write_text(yaml.safe_dump({"dataset": params["dataset"]}, sort_keys=False))
    pd.read_parquet(ROOT / "data/sources/adult.parquet").iloc[::8].to_parquet(repo / "data/sources/adult.parquet")
    adult = yaml.safe_load((ROOT / "data/datasets/adult.yaml").read_text())["dataset"] | {"sha256": None}
    (repo / "data/datasets/adult.yaml").write_text(yaml.safe_dump({"dataset": adult}, sort_keys=False))

    out = run(repo, TRAINFLOW, "use", "adult")
    assert out.returncode == 0, out.stderr
    assert "champion: none yet for adult--income" in out.stdout and "kept for when you switch back" in out.stdout
    assert "evaluate.primary: rmse -> " in out.stderr and not (repo / "models/production").exists()
    assert (repo / "models/.production.datasets/california_housing--MedHouseVal").resolve() == housing

    repro = sh(repo, "dvc", "repro").stdout
    assert "promoted: test " in repro and "vs the class-prior baseline" in repro, repro
    adult_champion = (repo / "models/production").resolve()
    manifest = json.loads((adult_champion / "manifest.json").read_text())
    assert manifest["task"] == "binary" and manifest["target"] == "income" and adult_champion != housing
    metrics = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert 0.75 < metrics["roc_auc"] <= 1 and 0.5 < metrics["accuracy"] <= 1

    back = run(repo, TRAINFLOW, "use", "housing")
    assert back.returncode == 0 and "the california_housing--MedHouseVal champion" in back.stdout, back.stdout
    assert (repo / "models/production").resolve() == housing
    assert (repo / "models/.production.datasets/adult--income").resolve() == adult_champion
    repro = sh(repo, "dvc", "repro").stdout  # the same data and params as the housing champion's run
    assert "vs champion" in repro and "not promoted: test RMSE" in repro, repro  # compared, not refused
    assert (repo / "models/production").resolve() == housing


@pytest.mark.slow
def test_trainflow_run_keeps_one_local_prefect_server_for_later_runs(reproduced, tmp_path):
    """With no PREFECT_API_URL, the first `trainflow run` starts a local server on 127.0.0.1 and leaves it
    running; the next run reuses it (no server start to pay) and both runs are in its database, for its UI;
    `trainflow server --stop` stops it."""
    import urllib.request

    repo = copy_repo(reproduced, tmp_path / "repo")  # every stage up to date: two no-op loops
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "home"), "TRAINFLOW_PREFECT_SERVER": "local", "DO_NOT_TRACK": "1"}
    try:
        first = sh(repo, TRAINFLOW, "run", env=env, timeout=300)
        assert "Prefect server started for this and later runs: http://127.0.0.1:" in first.stdout
        record = json.loads((tmp_path / "home/trainflow-server.json").read_text())
        assert record["url"].startswith("http://127.0.0.1:")
        assert record["early"]  # started before the run imported Prefect (the project's [tool.prefect] names no server)
        # the report tells the wait for the server from what the run did meanwhile (imports, DVC's status)
        it = json.loads((repo / "reports/iteration.timeline.json").read_text())
        runner = [(p["phase"], p["start_s"], p["end_s"]) for p in it["timeline"] if p["stage"] == "runner"]
        waits = [(a, b) for phase, a, b in runner if phase == "server start"]
        meanwhile = [(a, b) for phase, a, b in runner[1:] if phase in ("imports", "dvc status") and b <= waits[-1][1]]
        assert waits and meanwhile and not any(a < d and c < b for a, b in waits for c, d in meanwhile)  # none overlap
        assert it["overhead"]["dvc status"] > 0 and it["overhead"]["imports"] > it["timeline"][0]["end_s"]
        server = psutil.Process(record["pid"])
        listening = [c for p in [server, *server.children(True)] for c in p.net_connections("inet") if c.status == "LISTEN"]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
        second = sh(repo, TRAINFLOW, "run", env=env, timeout=300)
        assert "Prefect server started" not in second.stdout and "stages: ingest cached" in second.stdout
        it = json.loads((repo / "reports/iteration.timeline.json").read_text())
        assert it["overhead"]["server start"] < 5  # a flow run created on a running server, not a server started
        request = urllib.request.Request(f"{record['url']}/flow_runs/count", data=b"{}", method="POST")
        request.add_header("Content-Type", "application/json")
        assert json.loads(urllib.request.urlopen(request, timeout=10).read()) == 2  # both runs, in its UI
        assert "Prefect server: " + record["url"].removesuffix("/api") in sh(repo, TRAINFLOW, "server", env=env).stdout
    finally:
        stopped = sh(repo, TRAINFLOW, "server", "--stop", env=env, check=False)
    assert "stopped the Prefect server" in stopped.stdout, stopped.stdout + stopped.stderr
    assert not psutil.pid_exists(record["pid"]) or psutil.Process(record["pid"]).status() == psutil.STATUS_ZOMBIE
    assert "no local Prefect server is running" in sh(repo, TRAINFLOW, "server", env=env).stdout


def test_predict_from_the_command_line(repo, packaged, tmp_path):
    import pandas as pd

    s = packaged[2]
    pd.read_parquet(Path(s.preprocess.out_dir) / "test_raw").head(100).to_csv(tmp_path / "rows.csv", index=False)
    proc = run(repo, TRAINFLOW, "predict", s.package.archive, str(tmp_path / "rows.csv"), str(tmp_path / "out.parquet"))
    assert proc.returncode == 0, proc.stderr
    assert "100 rows: 100 predicted" in proc.stdout and len(pd.read_parquet(tmp_path / "out.parquet")) == 100


@pytest.mark.slow
def test_ui_starts_a_prefect_server_on_loopback_and_says_where(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PREFECT_HOME=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.Popen(
        [TRAINFLOW, "ui", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == f"Prefect UI: http://127.0.0.1:{port}"
        assert f"export PREFECT_API_URL=http://127.0.0.1:{port}/api" in proc.stdout.readline()
        import urllib.request

        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer in 90 s"
                time.sleep(0.5)
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
        listening = {c.laddr.ip for p in tree for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}, listening
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
