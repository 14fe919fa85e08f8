"""Run a Python snippet in a fresh process; return what it prints last (JSON) and the peak resident memory
of the process and all its children together (Dask workers included), sampled every 50 ms."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def measured(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'bench'}", "DO_NOT_TRACK": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(err[-3000:])
    return json.loads(out.strip().splitlines()[-1]) | {"peak_rss_gib": peak / 2**30}
