"""Prefect as a team runs it, across hosts (tests/multihost.py): PostgreSQL on a database host, a Prefect server
on a server host using it, a process work pool with a worker on each of two worker hosts, deployments made from
prefect.yaml on a client host, all on one workspace on the shared path.

The concurrency contract (docs/running.md, "Many runs, one workspace"): a deployment runs one flow run at a
time (concurrency_limit: 1); runs submitted together wait in the server's queue (AwaitingConcurrencySlot) and
each runs in turn, on whichever worker takes it; a run whose parameters differ from params.yaml is a DVC
experiment in a worktree of its own, so none touches another's outputs or the workspace's; a run started
outside the deployment's queue (`trainflow run`) while one runs finds the workspace's DVC lock held and stops at
once, naming it.
"""

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_repo, load_package
from tests.multihost import BIN, available, project_network
from tests.services import Postgres, api_call, prefect_env, prefect_server

pytestmark = [
    pytest.mark.slow,  # real servers and flow runs on several hosts: `make test-fast` skips them
    pytest.mark.skipif(available() is not None, reason=str(available())),
]

HOSTS = {"db": 41, "server": 40, "worker1": 11, "worker2": 12, "client": 20}
LRS = (0.003, 0.005, 0.02, 0.03)  # four experiments' train.lr (params.yaml has 0.01)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    with project_network(HOSTS, tmp_path_factory.mktemp("team")) as net:
        yield net


@pytest.fixture(scope="module")
def db(net):
    with Postgres(net["db"]) as db:
        yield db


@pytest.fixture(scope="module")
def api(net, db):
    # a queued run asks again for its slot after 2 s (Prefect's default: 30 s)
    with prefect_server(net["server"], db.url, PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="2") as api:
        yield api


@pytest.fixture(scope="module")
def team(net, api, reproduced, tmp_path_factory):
    """The workspace (a reproduced repo on the shared path), its deployments made from the client host with
    prefect.yaml, and a process worker of the `trainflow` pool on each worker host."""
    repo = copy_repo(reproduced, tmp_path_factory.mktemp("team-ws") / "repo")
    client = net["client"]
    client.run(
        str(BIN / "prefect"), "work-pool", "create", "trainflow", "--type", "process", cwd=repo, env=prefect_env(client, api)
    )
    client.run(str(BIN / "prefect"), "--no-prompt", "deploy", "--all", cwd=repo, env=prefect_env(client, api), timeout=300)
    workers = []
    for w in ("worker1", "worker2"):
        worker = [str(BIN / "prefect"), "worker", "start", "--pool", "trainflow", "--type", "process", "--name", w]
        workers.append(net[w].spawn(*worker, log=f"{w}-prefect-worker.log", cwd=repo, env=prefect_env(net[w], api)))
    yield repo, api_call(client, api, "GET", "/deployments/name/training-pipeline/training-pipeline")
    for proc in workers:  # before the server they talk to
        net.stop(proc)


def outputs(repo: Path) -> dict:
    """Every file of the workspace but git's and DVC's own (cache, locks) and the champion (deployment state that
    every run's gate compares against and may promote to): what no experiment may change."""
    from tasks.files import sha256_file

    skip = (".git/", ".dvc/tmp/", ".dvc/cache/", "models/production", "models/.production")
    return {
        p.relative_to(repo).as_posix(): sha256_file(p)
        for p in sorted(repo.rglob("*"))
        if p.is_file() and not p.relative_to(repo).as_posix().startswith(skip) and ".git" not in p.parts
    }


WAIT = """
import json, sys, time, urllib.request
api, ids, deadline = sys.argv[1], json.loads(sys.argv[2]), time.time() + float(sys.argv[3])
def get(path):
    return json.load(urllib.request.urlopen(api + path, timeout=60))
while True:
    runs = [get(f"/flow_runs/{i}") for i in ids]
    if all(r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs) or time.time() > deadline:
        break
    time.sleep(1)
print(json.dumps([dict(id=r["id"], state=r["state"]["type"], name=r["state"]["name"], start=r["start_time"],
                       end=r["end_time"], states=[s["name"] for s in get(f"/flow_run_states/?flow_run_id={r['id']}")])
                  for r in runs]))
"""


def submit(net, api: str, dep: dict, parameters: list[dict]) -> list[str]:
    """What the UI's Custom run form does, for several runs at once (one request each, back to back)."""
    return [
        api_call(net["client"], api, "POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": p})["id"]
        for p in parameters
    ]


def test_a_run_outside_the_queue_finds_the_workspace_busy_and_stops_at_once(net, api, team):
    repo, dep = team
    (run_id,) = submit(net, api, dep, [{"train": {"lr": 0.004}}])
    worktrees = repo / ".dvc/tmp/trainflow-exps"
    deadline = time.time() + 120
    while not (worktrees.is_dir() and any(worktrees.iterdir())):  # the deployment run holds the lock from here
        assert time.time() < deadline, "the deployment run did not start"
        time.sleep(0.2)
    t0 = time.perf_counter()
    env = prefect_env(net["client"], api, PYTHONPATH=str(repo))
    proc = net["client"].run(str(BIN / "python"), "-m", "flows.pipeline", cwd=repo, env=env, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # (above it, Prefect's log of the failed flow run)
    assert last.startswith(f"error: {repo} is busy: another Trainflow run or DVC command holds its lock"), proc.stderr
    print(f"trainflow run while a deployment run works: refused in {time.perf_counter() - t0:.1f} s")
    (run,) = net["client"].python(WAIT, api, json.dumps([run_id]), "240", timeout=300)
    assert run["state"] == "COMPLETED", run


def test_four_runs_submitted_at_once_queue_and_each_completes_as_its_own_experiment(net, api, team):
    repo, dep = team
    before = outputs(repo)
    t0 = time.perf_counter()
    ids = submit(net, api, dep, [{"train": {"lr": lr}} for lr in LRS])
    runs = net["client"].python(WAIT, api, json.dumps(ids), "600", timeout=660)
    seconds = time.perf_counter() - t0
    assert [r["state"] for r in runs] == ["COMPLETED"] * 4, runs
    # one at a time: the runs' running intervals do not overlap, and the ones behind waited for the slot
    spans = sorted((r["start"], r["end"]) for r in runs)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans
    assert sum("AwaitingConcurrencySlot" in r["states"] for r in runs) >= 2, [r["states"] for r in runs]
    # each run is a DVC experiment of its own; `dvc exp show` lists them all with their own params and lineage
    shown = json.loads(net["client"].run(str(BIN / "dvc"), "exp", "show", "--json", cwd=repo).stdout)
    experiments = {
        e["name"]: e for row in shown for e in (row.get("experiments") or []) for e in (e.get("revs") or [])
    }  # fmt: skip
    models = set()
    for run, lr in zip(runs, LRS):
        (name,) = [n for n in experiments if n and n.endswith(run["id"].replace("-", "")[:8])]
        data = experiments[name]["data"]
        assert data["params"]["params.yaml"]["data"]["train"]["lr"] == lr
        assert data["metrics"]["reports/evaluate/metrics.json"]["data"]["rmse"] > 0
        lock = yaml.safe_load(net["client"].run("git", "show", f"{experiments[name]['rev']}:dvc.lock", cwd=repo).stdout)
        assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["lr"] == lr  # the model came from its own params
        models.add(next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "models/train"))
    assert len(models) == 4  # four different models, each in the cache
    assert outputs(repo) == before  # the workspace's params, dvc.lock and outputs as they were
    # the champion: whichever run's model won its gate last, promoted whole (verified against its manifest)
    assert load_package(repo / "models/production").manifest["params"]["train"]["lr"] in (*LRS, 0.004, 0.01)
    workers = {
        w: (net.logs / f"{w}-prefect-worker.log").read_text().count("submitted to infrastructure") for w in ("worker1", "worker2")
    }
    print(f"4 runs submitted at once: all completed in {seconds:.1f} s, one at a time; flow runs taken per worker {workers}")


def test_a_run_started_while_postgres_is_down_is_named_with_the_fix(net, db, api, team):
    repo, _ = team
    db.stop()
    try:
        env = prefect_env(net["client"], api, PYTHONPATH=str(repo))
        proc = net["client"].run(str(BIN / "python"), "-m", "flows.pipeline", cwd=repo, env=env, check=False, timeout=120)
    finally:
        db.start()
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: PREFECT_API_URL={api} answers, but the server cannot reach its database ({api}/ready: 503); start the "
        "database it uses (the server's PREFECT_API_DATABASE_CONNECTION_URL, e.g. PostgreSQL) and run again"
    ), proc.stderr
    assert api_call(net["client"], api, "GET", "/ready") == {"message": "OK"}  # and the server goes on once it is back
