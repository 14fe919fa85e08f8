"""Deployments against a real `prefect server start` (SQLite, 127.0.0.1): `flows.serve`, a process worker
from prefect.yaml, and runs triggered through the REST call the UI makes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, make_repo, sh

STAGES = ["ingest", "validate", "preprocess", "train", "evaluate", "package", "promote"]
DEPLOYMENT = "training-pipeline/training-pipeline"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME (SQLite), restartable."""

    def __init__(self, home: Path):
        self.port, self.home, self.proc = free_port(), home, None
        home.mkdir(parents=True, exist_ok=True)
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_API_URL=self.api, DO_NOT_TRACK="1",
                        PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1",
                        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    def start(self):
        self.proc = subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
                                      "--analytics-off"], env=self.env, cwd=self.home,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if self.call("GET", "/health") is True:
                    return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("prefect server did not become healthy in 90 s")

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)

    def call(self, method: str, path: str, body=None, tries: int = 30):
        req = urllib.request.Request(self.api + path, method=method, headers={"content-type": "application/json"},
                                     data=None if body is None else json.dumps(body).encode())
        for attempt in range(tries):
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return json.load(resp)
            except urllib.error.HTTPError as e:
                # SQLite busy while a run writes: Prefect answers 503, and the UI (like us) tries again
                if e.code != 503 or attempt == tries - 1:
                    raise
                time.sleep(0.5)

    def spawn(self, *cmd: str, cwd: Path) -> subprocess.Popen:
        log = open(self.home / f"{cmd[-1].replace('.', '-')}.log", "ab")  # kept for debugging a failed run
        return subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def deployment(self, paused=None, timeout=60) -> dict:
        deadline = time.time() + timeout
        while True:
            try:
                dep = self.call("GET", f"/deployments/name/{DEPLOYMENT}")
                if paused is None or dep["paused"] == paused:
                    return dep
            except urllib.error.HTTPError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"deployment {DEPLOYMENT} not ready (paused={paused})")
            time.sleep(0.5)

    def trigger(self, dep: dict, parameters: dict) -> str:
        """What the UI's custom-run form does."""
        return self.call("POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters})["id"]

    def wait(self, run_id: str, timeout=300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            run = self.call("GET", f"/flow_runs/{run_id}")
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                if run["state"]["type"] != "COMPLETED":
                    logs = self.call("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}})
                    print("\n".join(entry["message"] for entry in logs))
                return run
            time.sleep(0.3)
        raise TimeoutError(f"flow run {run_id} did not finish in {timeout} s")

    def task_states(self, run_id: str) -> dict:
        runs = self.call("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
        return {r["name"].rsplit("-", 1)[0]: r["state"]["name"] for r in runs}

    def artifacts(self, run_id: str) -> dict:
        found = self.call("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
        return {a["key"]: a["data"] for a in found}


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM a serve/worker process (before the server it talks to); SIGKILL it if it has not ended in 60 s
    (on a loaded 2-core machine a worker's graceful shutdown has taken longer)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("prefect-home")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("served"))


def test_served_deployment_runs_ui_triggered_runs(server, repo):
    serve = server.spawn(sys.executable, "-m", "flows.serve", cwd=repo)
    try:
        dep = server.deployment(paused=False)
        cron = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]["schedules"][0]["cron"]
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == [cron]
        # the UI form: typed sections, with descriptions and bounds, defaults from params.yaml
        schema = dep["parameter_openapi_schema"]
        lr = schema["definitions"]["TrainSettings"]["properties"]["lr"]
        assert lr["exclusiveMinimum"] == 0 and "learning rate" in lr["description"]
        params = yaml.safe_load((repo / "params.yaml").read_text())
        assert schema["properties"]["train"]["default"]["epochs"] == params["train"]["epochs"]

        # an invalid value is refused before anything runs
        with pytest.raises(urllib.error.HTTPError) as e:
            server.trigger(dep, {"train": dict(params["train"], lr=-1)})
        assert e.value.code == 409 and "train.lr" in e.value.read().decode()
        # so is a source URL with credentials in it: refused before a run (and its parameters) is stored
        secret = "hunter2-s3cr3t"
        with pytest.raises(urllib.error.HTTPError) as e:
            server.trigger(dep, {"dataset": dict(params["dataset"], source=f"https://alice:{secret}@example.com/x.csv")})
        assert e.value.code == 409 and "dataset.source" in e.value.read().decode()

        # a run with the defaults runs every stage; the same run again skips them all
        first = server.wait(server.trigger(dep, {}))
        assert first["state"]["type"] == "COMPLETED"
        assert server.task_states(first["id"]) == {s: "Completed" for s in STAGES}
        again = server.wait(server.trigger(dep, {}))
        assert server.task_states(again["id"]) == {s: "Cached" for s in STAGES}
        assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}

        # a UI run with a changed parameter trains with it, as a DVC experiment
        t0 = time.perf_counter()
        run = server.wait(server.trigger(dep, {"train": dict(params["train"], epochs=2)}))
        print(f"REST trigger -> completed run: {time.perf_counter() - t0:.1f} s")
        assert run["state"]["type"] == "COMPLETED"
        assert server.task_states(run["id"]) == {"ingest": "Cached", "validate": "Cached", "preprocess": "Cached",
                                                  "train": "Completed", "evaluate": "Completed", "package": "Completed",
                                                  "promote": "Completed"}
        summary = server.artifacts(run["id"])["training-summary"]
        assert "`train.epochs`: 3 → 2" in summary and "DVC experiment `prefect-" in summary
        shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
        exps = [e["revs"][0]["data"] for base in shown for e in (base.get("experiments") or [])]
        assert [x["params"]["params.yaml"]["data"]["train"]["epochs"] for x in exps] == [2]
        assert (repo / "params.yaml").read_text() == yaml.safe_dump(params, sort_keys=False)  # untouched
    finally:
        stop(serve)
    # the secret is nowhere: not in the server's database (runs, logs, parameters), not in the workspace
    assert not [p for p in server.home.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not [p for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts and secret.encode() in p.read_bytes()]

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
