"""Deployments against a real `prefect server start` (SQLite, 127.0.0.1): `flows.serve` (`trainflow serve`),
a process worker from prefect.yaml; runs triggered through the REST API, the CLI, and the v2 UI's Custom
run form in headless Chromium (Debian's package, driven by Playwright) as a person uses it."""

import json
import re
import sys
import time
import urllib.error

import pytest
import yaml

from tests.conftest import ROOT, STAGES, make_repo, sh
from tests.harness import Server, browser, stop

pytestmark = pytest.mark.slow  # real clusters, servers, flows or several ranks: `make test-fast` skips them


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("prefect-home")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def served(server, repo):
    """`trainflow serve`'s process (flows.serve) in the repo; the tests below use its deployments, in order."""
    serve = server.spawn(sys.executable, "-m", "flows.serve", cwd=repo)
    yield serve
    if serve.poll() is None:
        stop(serve)


@pytest.fixture(scope="module")
def page():
    pw, chromium = browser()
    page = chromium.new_page(viewport={"width": 1300, "height": 1100})
    yield page
    chromium.close()
    pw.stop()


def test_served_deployments_start_runs_from_every_door(server, repo, served):
    dep = server.deployment(paused=False)
    predict = server.deployment(paused=False, name="batch-predict/batch-predict")  # both are served
    assert dep["global_concurrency_limit"]["limit"] == 1 == predict["global_concurrency_limit"]["limit"]  # as documented
    cron = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]["schedules"][0]["cron"]
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == [cron]
    # the UI form: per-run settings first, every field optional with params.yaml's value, bounds in words
    schema = dep["parameter_openapi_schema"]
    assert list(schema["properties"]) == ["dataset", "train", "evaluate", "preprocess", "validate", "advanced"]
    lr = schema["definitions"]["train"]["properties"]["lr"]
    assert lr["title"] == "lr" and lr["exclusiveMinimum"] == 0 and lr["description"].endswith("Allowed: > 0, ≤ 10.")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert schema["definitions"]["train"]["properties"]["epochs"]["default"] == params["train"]["epochs"]
    assert not [name for name, d in schema["definitions"].items() if d.get("required")]
    assert "out_dir" not in json.dumps(schema) and "anyOf" not in json.dumps(schema)  # no paths, no null branches

    # an invalid value is refused before anything runs, naming the field
    with pytest.raises(urllib.error.HTTPError) as e:
        server.trigger(dep, {"train": {"lr": -1}})
    assert e.value.code == 409 and "train.lr" in e.value.read().decode()
    # so is a source URL with credentials in it: refused before a run (and its parameters) is stored
    secret = "hunter2-s3cr3t"
    with pytest.raises(urllib.error.HTTPError) as e:
        server.trigger(dep, {"dataset": {"source": f"https://alice:{secret}@example.com/x.csv"}})
    assert e.value.code == 409 and "dataset.source" in e.value.read().decode()

    # an empty form runs every stage on params.yaml; the same run again skips them all
    first = server.wait(server.trigger(dep, {}))
    assert first["state"]["type"] == "COMPLETED"
    assert server.task_states(first["id"]) == {s: "Completed" for s in STAGES}
    again = server.wait(server.trigger(dep, {}))
    assert server.task_states(again["id"]) == {s: "Cached" for s in STAGES}
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}

    # one key from the shell: every other key is params.yaml's; it trains with it, as a DVC experiment
    t0 = time.perf_counter()
    out = sh(
        repo,
        "prefect",
        "deployment",
        "run",
        "training-pipeline/training-pipeline",
        "--params",
        json.dumps({"train": {"epochs": 2}}),
        "--watch",
        env=server.env,
        timeout=300,
    )
    print(f"CLI trigger -> finished run: {time.perf_counter() - t0:.1f} s")
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout)[1]
    run = server.call("GET", f"/flow_runs/{run_id}")
    assert run["state"]["type"] == "COMPLETED" and run["parameters"] == {"train": {"epochs": 2}}
    assert server.task_states(run_id) == {
        "ingest": "Cached",
        "validate": "Cached",
        "preprocess": "Cached",
        "train": "Completed",
        "evaluate": "Completed",
        "package": "Completed",
        "promote": "Completed",
    }
    summary = server.artifacts(run_id)["training-summary"]
    assert "`train.epochs`: 3 → 2" in summary and "DVC experiment `prefect-" in summary
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    exps = [e["revs"][0]["data"] for base in shown for e in (base.get("experiments") or [])]
    assert [x["params"]["params.yaml"]["data"]["train"]["epochs"] for x in exps] == [2]
    assert yaml.safe_load((repo / "params.yaml").read_text()) == params  # untouched
    # the secret is nowhere: not in the server's database (runs, logs, parameters), not in the workspace
    assert not [p for p in server.home.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not [p for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts and secret.encode() in p.read_bytes()]


def custom_run_form(page, server, dep) -> None:
    """The deployment page -> Run -> Custom run, as a person clicks through it."""
    page.goto(f"http://127.0.0.1:{server.port}/v2/deployments/deployment/{dep['id']}")
    page.get_by_role("button", name="Run").first.click()
    page.get_by_role("menuitem", name="Custom run").click()
    page.get_by_text("epochs (Optional)", exact=True).wait_for(timeout=30_000)


def field(page, title: str):
    """The input under a form field's title."""
    return page.locator(f"xpath=//*[normalize-space(text())='{title} (Optional)']/ancestor::*[.//input][1]//input").first


def submit(page) -> tuple[int, dict]:
    """Click Submit; the server's answer to the create-flow-run request the form sends."""
    with page.expect_response(lambda r: "create_flow_run" in r.url, timeout=30_000) as answer:
        page.get_by_role("button", name="Submit").click()
    return answer.value.status, answer.value.json()


def test_the_unchanged_form_starts_a_run_that_completes(server, served, page, tmp_path):
    """In Chromium, as a person clicks: the deployment page, Run, Custom run, Submit with nothing changed."""
    dep = server.deployment(paused=False)
    t0 = time.perf_counter()
    custom_run_form(page, server, dep)
    assert field(page, "epochs").input_value() == "3" and field(page, "lr").input_value() == "0.01"  # params.yaml's
    assert page.get_by_text("Peak learning rate of AdamW (see train.schedule). Allowed: > 0, ≤ 10.").count() == 1  # bounds shown
    page.screenshot(path=tmp_path / "form.png", full_page=True)
    status, created = submit(page)
    assert status == 201, created
    run = server.wait(created["id"])
    print(f"browser: form opened, submitted unchanged, run completed in {time.perf_counter() - t0:.1f} s")
    assert run["state"]["type"] == "COMPLETED"
    assert server.task_states(run["id"]) == {s: "Cached" for s in STAGES}  # params.yaml's run is up to date


def test_a_value_changed_in_the_form_runs_with_it_as_an_experiment(server, served, page):
    dep = server.deployment(paused=False)
    custom_run_form(page, server, dep)
    field(page, "min_improvement").fill("0.5")
    status, created = submit(page)
    assert status == 201, created
    run = server.wait(created["id"])
    assert run["state"]["type"] == "COMPLETED" and run["state"]["name"] == "Not promoted"  # no model is 50% better
    assert server.task_states(run["id"])["evaluate"] == "Completed"
    summary = server.artifacts(run["id"])["training-summary"]
    assert "`evaluate.min_improvement`: 0.0 → 0.5" in summary and "DVC experiment `prefect-" in summary


def test_an_out_of_bounds_value_is_refused_naming_the_field_and_nothing_runs(server, served, page):
    dep = server.deployment(paused=False)
    before = len(server.call("POST", "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}}))
    custom_run_form(page, server, dep)
    field(page, "lr").fill("-1")
    status, answer = submit(page)
    assert status == 409 and "train.lr" in answer["detail"] and "minimum of 0" in answer["detail"]
    page.get_by_text("Validation failed for field 'train.lr'").wait_for(timeout=10_000)  # what the person sees
    after = len(server.call("POST", "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}}))
    assert after == before


def test_served_runs_fork_from_a_warm_process_and_never_run_stale_code(server, repo, served):
    """`trainflow serve` runs each flow run in a process forked from one that imported the stage modules once
    (no imports to pay per run); when the project's code changes between two triggered runs, that process is
    restarted and the next run executes the new code."""
    import psutil

    def warm_servers() -> list:
        # the warm process: a child of serve (the runs it forks are its children, with its command line)
        return [p for p in psutil.Process(served.pid).children() if "forkserver" in " ".join(p.cmdline())]

    dep = server.deployment()
    first = server.wait(server.trigger(dep, {}))
    assert first["state"]["type"] == "COMPLETED"
    (warm,) = warm_servers()
    assert "tasks.train" in " ".join(warm.cmdline())  # preloaded with the stage modules
    # and the run says so, in its iteration report
    said = server.artifacts(first["id"])["iteration"]
    assert "**Warm process:** forked from `trainflow serve`'s warm process (started 20" in said
    assert "prefect, pandas, great_expectations, distributed, torch, onnxscript already imported" in said
    report = repo / "flows/report.py"  # code of the flow, not a DVC dependency: no stage reruns for it
    original = report.read_text()
    report.write_text(original + '\nDIRECTION += " (edited between two runs)"\n')
    try:
        run = server.wait(server.trigger(dep, {}))
        assert run["state"]["type"] == "COMPLETED"
        assert "(edited between two runs)" in server.artifacts(run["id"])["training-summary"]  # the new code ran
        assert [p.pid for p in warm_servers()] != [warm.pid]  # in a restarted warm process
        assert " restart(s) for code changes): " in server.artifacts(run["id"])["iteration"]  # which its report says
    finally:
        report.write_text(original)


def test_served_runs_read_params_and_data_as_they_are_when_triggered(server, repo, served):
    """The warm process holds imported modules only, never settings or features: params.yaml or the source data
    changed between two triggered runs is what the next run trains on (DVC reruns what depends on it)."""
    import pandas as pd

    dep = server.deployment()
    assert server.wait(server.trigger(dep, {}))["state"]["type"] == "COMPLETED"
    params, source = repo / "params.yaml", repo / "data/sources/slice.parquet"
    original, data = params.read_text(), source.read_bytes()
    lock = lambda: yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    try:
        assert lock()["train"]["params"]["params.yaml"]["train"]["epochs"] == 3
        params.write_text(original.replace("  epochs: 3\n", "  epochs: 2\n", 1))
        assert server.wait(server.trigger(dep, {}))["state"]["type"] == "COMPLETED"
        assert lock()["train"]["params"]["params.yaml"]["train"]["epochs"] == 2
        assert json.loads((repo / "models/train/summary.json").read_text())["epochs_run"] == 2
        rows = pd.read_parquet(source)
        rows.iloc[:-50].to_parquet(source, index=False)
        before = lock()["ingest"]["outs"][0]["md5"]
        assert server.wait(server.trigger(dep, {}))["state"]["type"] == "COMPLETED"
        assert lock()["ingest"]["outs"][0]["md5"] != before
        assert json.loads((repo / "reports/validate/report.json").read_text())["rows"]["input"] == len(rows) - 50
    finally:
        params.write_text(original)
        source.write_bytes(data)
    # the workspace back as the module's later tests expect it: every stage up to date
    assert server.wait(server.trigger(dep, {}))["state"]["type"] == "COMPLETED"


def test_stopping_serve_pauses_the_deployment_and_the_server_keeps_its_schedule(server, repo, served):
    cron = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]["schedules"][0]["cron"]
    stop(served)
    # stopping serve pauses the deployment and keeps its schedule; so does restarting the server
    assert server.deployment(paused=True)["schedules"][0]["schedule"]["cron"] == cron
    server.stop()
    server.start()
    assert server.deployment()["schedules"][0]["schedule"]["cron"] == cron
    serve = server.spawn(sys.executable, "-m", "flows.serve", cwd=repo)
    try:
        assert server.deployment(paused=False)["schedules"][0]["schedule"]["cron"] == cron
    finally:
        stop(serve)


def test_prefect_yaml_deploys_onto_a_process_worker(server, repo):
    sh(repo, "prefect", "work-pool", "create", "trainflow", "--type", "process", env=server.env)
    sh(repo, "prefect", "--no-prompt", "deploy", "--all", env=server.env)
    dep = server.deployment()
    assert dep["work_pool_name"] == "trainflow"
    assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(repo)}}]
    assert dep["global_concurrency_limit"]["limit"] == 1
    worker = server.spawn("prefect", "worker", "start", "--pool", "trainflow", "--type", "process", cwd=repo)
    try:
        run = server.wait(server.trigger(dep, {}))
        assert run["state"]["type"] == "COMPLETED"
        assert server.task_states(run["id"]) == {s: "Cached" for s in STAGES}  # the workspace is up to date
    finally:
        stop(worker)
