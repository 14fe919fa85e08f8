"""Orchestration overhead of the training-pipeline flow on the default data, side by side in one run.

Run: .venv/bin/python bench/orchestration.py      (about 4 minutes on 2 cores)

In a fresh clone of this repository (no DVC cache, so the first run is cold) with a real Prefect server
on 127.0.0.1, it measures:
  - a cold full run: flow wall time vs the sum of the stages' own times (the difference is orchestration:
    process start and imports, Prefect task/flow bookkeeping, DVC status/commit, artifacts)
  - a no-op rerun (nothing changed) against the server and against Prefect's temporary local server
  - a rerun after changing one train.* parameter in params.yaml: which stages ran
  - the REST call the UI makes -> completed run, for a no-op run and for a changed-parameter run
    (a DVC experiment), executed by `python -m flows.serve`
"""

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.harness import Server, stop  # noqa: E402  (the same real-server harness the tests use)


def flow_cli(repo: Path, env: dict) -> tuple[float, dict]:
    """`python -m flows.pipeline`; returns wall seconds and {stage: (status, seconds)} from its summary line."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("stages: "))
    stages = {m[0]: (m[1], float(m[2])) for m in re.findall(r"(\w+) (ran|cached) ([\d.]+)s", line)}
    return wall, stages


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="trainflow-bench-"))
    repo = tmp / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    server = Server(tmp / "home").start()
    ephemeral = {k: v for k, v in server.env.items() if k not in ("PREFECT_API_URL",)}
    ephemeral["PREFECT_HOME"] = str(tmp / "ephemeral-home")
    rows = []
    try:
        wall, stages = flow_cli(repo, server.env)
        work = sum(s for _, s in stages.values())
        rows.append(
            (
                "cold full run (server)",
                wall,
                f"stages {work:.1f} s, orchestration {wall - work:.1f} s "
                f"({(wall - work) / wall:.0%}); " + ", ".join(f"{k} {s:.1f}" for k, (_, s) in stages.items()),
            )
        )
        flow_cli(repo, ephemeral)  # let the temporary server create its database once (not timed)
        for label, env in (("no-op rerun (server)", server.env), ("no-op rerun (temporary server)", ephemeral)):
            wall, stages = flow_cli(repo, env)
            rows.append((label, wall, "ran: " + (", ".join(k for k, (st, _) in stages.items() if st == "ran") or "none")))

        params = yaml.safe_load((repo / "params.yaml").read_text())
        edited = (repo / "params.yaml").read_text().replace("epochs: 100", "epochs: 40")
        (repo / "params.yaml").write_text(edited)
        wall, stages = flow_cli(repo, server.env)
        rows.append(
            (
                "train.epochs 100 -> 40 in params.yaml",
                wall,
                "ran: " + ", ".join(k for k, (st, _) in stages.items() if st == "ran"),
            )
        )
        subprocess.run(["git", "checkout", "-q", "params.yaml"], cwd=repo, check=True)
        flow_cli(repo, server.env)  # back in sync with params.yaml (train reruns: the run-cache is not used)

        serve = server.spawn(sys.executable, "-m", "flows.serve", cwd=repo)
        try:
            dep = server.deployment(paused=False)
            for label, parameters in (
                ("REST trigger -> completed, no-op", {}),
                ("REST trigger -> completed, train.epochs=40 (experiment)", {"train": dict(params["train"], epochs=40)}),
            ):
                t0 = time.perf_counter()
                run = server.wait(server.trigger(dep, parameters))
                states = server.task_states(run["id"])
                rows.append(
                    (
                        label,
                        time.perf_counter() - t0,
                        f"{run['state']['type']}; ran: " + (", ".join(k for k, v in states.items() if v != "Cached") or "none"),
                    )
                )
        finally:
            stop(serve)
    finally:
        server.stop()
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measurement':<{width}}  {'wall s':>7}  detail")
    for label, wall, detail in rows:
        print(f"{label:<{width}}  {wall:7.1f}  {detail}")
    print(f"\n(2-core CPU; workspace {repo})")


if __name__ == "__main__":
    os.environ.setdefault("DO_NOT_TRACK", "1")
    main()
