"""Real components the tests (and bench/) start and stop: a Prefect server, a browser. One place, imported by
tests and benchmarks alike."""

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

DEPLOYMENT = "training-pipeline/training-pipeline"
ROOT = Path(__file__).resolve().parents[1]
FAULTS = Path(__file__).resolve().parent / "faults"
FAULT_ENV = "TRAINFLOW_INJECT_FAULT"


def fault(spec: str) -> dict:
    """The environment that makes a rank fail on cue ("kill|hang:RANK:STEP:MARKER", tests/faults/fault_hook.py)
    in every process started with it, and the hook installed in this one (a rank in the test's own process)."""
    import sys

    sys.path.insert(0, str(FAULTS))
    import fault_hook

    fault_hook.install()
    return {FAULT_ENV: spec, "PYTHONPATH": os.pathsep.join([str(FAULTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def snapshot(root: Path) -> dict:
    """Every file under root with its sha256: what must not change (but .git, and DVC's lock files in .dvc/tmp)."""
    from tasks.files import sha256_file

    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(root).parts and not p.relative_to(root).as_posix().startswith(".dvc/tmp/")
    }


CHROMIUM = "/usr/bin/chromium"  # Debian's package (`playwright install` cannot download here)


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
        self.env = dict(
            os.environ,
            PREFECT_HOME=str(home),
            PREFECT_API_URL=self.api,
            PREFECT_UI_API_URL=self.api,
            DO_NOT_TRACK="1",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_WORKER_QUERY_SECONDS="1",
            PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        )

    def start(self):
        self.proc = subprocess.Popen(
            ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port), "--analytics-off"],
            env=self.env,
            cwd=self.home,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
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
        req = urllib.request.Request(
            self.api + path,
            method=method,
            headers={"content-type": "application/json"},
            data=None if body is None else json.dumps(body).encode(),
        )
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
        with open(self.home / f"{cmd[-1].replace('.', '-')}.log", "ab") as log:  # kept for debugging a failed run
            return subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def deployment(self, paused=None, timeout=60, name: str = DEPLOYMENT) -> dict:
        deadline = time.time() + timeout
        while True:
            try:
                dep = self.call("GET", f"/deployments/name/{name}")
                if paused is None or dep["paused"] == paused:
                    return dep
            except urllib.error.HTTPError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"deployment {name} not ready (paused={paused})")
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


def browser():
    """Headless Chromium (Debian's) through Playwright: (playwright, browser); stop with close_browser."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise RuntimeError(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium); "
            "`playwright install` cannot download a browser here"
        )
    pw = sync_playwright().start()
    return pw, pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
