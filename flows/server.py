"""The Prefect server a run talks to: the one in PREFECT_API_URL, or Prefect's temporary local server.

A configured server must answer (else the run stops with the fix, not a connection traceback). With none
configured, the temporary server Prefect would start on first use is started up front, with a small reaper
process that stops it should the run be killed (SIGKILL, OOM) before its exit handlers run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tasks.errors import UserError


def telemetry_off() -> None:
    """Prefect's and DVC's telemetry off for this process and its children (entry points call it)."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def check_api() -> None:
    """A configured Prefect API must answer; otherwise say how to fix it instead of a connection traceback.
    With none configured, start the temporary local server (start_temporary_server)."""
    import urllib.request

    from prefect.settings import PREFECT_SERVER_EPHEMERAL_ENABLED, get_current_settings

    url = get_current_settings().api.url
    if not url:
        if PREFECT_SERVER_EPHEMERAL_ENABLED.value():  # else Prefect itself says to set PREFECT_API_URL
            start_temporary_server()
        return
    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10).close()
    except OSError as e:
        raise UserError(
            f"PREFECT_API_URL={url} does not answer ({getattr(e, 'reason', e)}); start the server "
            "(prefect server start --host 127.0.0.1) or unset PREFECT_API_URL to use a temporary local one"
        ) from None


REAPER = """
import os, signal, sys, time
pipe, pid = int(sys.argv[1]), int(sys.argv[2])
os.read(pipe, 1)  # returns when the flow process is gone, however it ended: it held the only write end
def ours():
    try:
        return b"prefect.server.api.server" in open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return False
if ours():
    os.kill(pid, signal.SIGTERM)
    for _ in range(50):
        time.sleep(0.1)
        if not ours():
            break
    else:
        os.kill(pid, signal.SIGKILL)
"""


def start_temporary_server() -> None:
    """Start the temporary local Prefect server that Prefect would start on first use (the same one: Prefect
    keeps it as a singleton and stops it at exit), plus a small process that stops it should this process be
    killed (SIGKILL, OOM) and never reach its exit handlers: no orphaned server is left holding its port."""
    import subprocess

    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    if server.server_process is None or not Path("/proc").is_dir():
        return
    read, write = os.pipe()  # neither end is inherited by the server or the ranks (O_CLOEXEC)
    subprocess.Popen(
        [sys.executable, "-c", REAPER, str(read), str(server.server_process.pid)],
        pass_fds=(read,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(read)
    _held.append(write)  # open until this process ends


_held: list[int] = []
