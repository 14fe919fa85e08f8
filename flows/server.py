"""The Prefect server a run talks to: the one in PREFECT_API_URL, or a local one Trainflow keeps running.

A configured server must answer (else the run stops with the fix, not a connection traceback). With none
configured, `trainflow run` uses this machine's local server: started by the first run (Prefect's server
on 127.0.0.1, a free port, PREFECT_HOME's database), recorded in PREFECT_HOME/trainflow-server.json
and reused by every later run, so a run does not pay a server's start (4-9 s) and every run stays visible in
its UI (`trainflow server` says where; `trainflow server --stop` stops it). TRAINFLOW_PREFECT_SERVER=temporary
gives Prefect's own temporary server instead, started for one run and stopped after it, with a small reaper
process that stops it should the run be killed (SIGKILL, OOM) before its exit handlers run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tasks.errors import InfrastructureError, UserError


def telemetry_off() -> None:
    """Prefect's and DVC's telemetry off for this process and its children (entry points call it)."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


MODE = "TRAINFLOW_PREFECT_SERVER"  # "local" (default: keep one running) or "temporary" (one per run)
RECORD = "trainflow-server.json"


@contextlib.contextmanager
def prefect_api(while_waiting=None):
    """The Prefect API of this command, for its duration: a configured one must answer; with none configured,
    this machine's local server (started if it is not running: see local_server's `while_waiting`), or a
    temporary one."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, get_current_settings, temporary_settings

    url = get_current_settings().api.url
    if url or os.environ.get(MODE, "local") != "local" or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        discard_early()
    if url:
        check_health(url)
        yield url
    elif not PREFECT_SERVER_EPHEMERAL_ENABLED.value():  # Prefect itself says to set PREFECT_API_URL
        yield None
    elif os.environ.get(MODE, "local") == "temporary":
        start_temporary_server()
        yield None
    else:
        url = local_server(while_waiting=while_waiting)
        os.environ["PREFECT_API_URL"] = url  # for child processes too
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url


def check_health(url: str) -> None:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10).close()
    except OSError as e:
        raise UserError(
            f"PREFECT_API_URL={url} does not answer ({getattr(e, 'reason', e)}); start the server "
            "(prefect server start --host 127.0.0.1) or unset PREFECT_API_URL to use a local one"
        ) from None
    try:  # the server answers without its database (PostgreSQL down): every call of the run would fail with a 500
        urllib.request.urlopen(f"{url.rstrip('/')}/ready", timeout=30).close()
    except urllib.error.HTTPError as e:
        if e.code == 503:
            raise UserError(
                f"PREFECT_API_URL={url} answers, but the server cannot reach its database ({url}/ready: 503); start "
                "the database it uses (the server's PREFECT_API_DATABASE_CONNECTION_URL, e.g. PostgreSQL) and run again"
            ) from None
    except OSError:
        pass  # an API without a readiness check (/health answered)


def healthy(url: str) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(f"{url}/health", timeout=2).close()
        return True
    except OSError:
        return False


def prefect_home() -> Path:
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


def running_server(home: Path | None = None) -> dict | None:
    """The local server a run started and left running (its record in PREFECT_HOME, or `home`), if it answers."""
    try:
        record = json.loads(((home or prefect_home()) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and healthy(str(record.get("url"))) else None


def local_server(timeout_s: float = 90, while_waiting=None) -> str:
    """The API URL of this machine's local Prefect server: the running one, or one started now (on 127.0.0.1,
    a free port, in its own session so it outlives this run). One start at a time (a lock in PREFECT_HOME).
    While a server starts, `while_waiting(ready)` may use the time (`ready()` says when the server answers)."""
    home = prefect_home()
    early = _early.pop(str(home.resolve()), None)
    discard_early()  # one started early for another PREFECT_HOME than Prefect's settings name
    if early is not None:  # started by start_early(), before Prefect was imported; its lock is held
        lock, proc, url, log = early
    else:
        home.mkdir(parents=True, exist_ok=True)
        lock = open(home / f"{RECORD}.lock", "w")  # noqa: SIM115  (closed by the `with lock:` below)
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = running_server()
        if record:
            lock.close()
            return record["url"]
        proc, url, log = _spawn(home)
    with lock:
        if while_waiting is not None:
            while_waiting(lambda: healthy(url))
        deadline = time.monotonic() + timeout_s
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                tail = log.read_text(errors="replace")[-1500:]
                raise InfrastructureError(f"the local Prefect server did not start ({log}):\n{tail}")
            time.sleep(0.1)
        record = {"url": url, "pid": proc.pid, "started": time.time(), "early": early is not None}  # (early: start_early)
        (home / RECORD).write_text(json.dumps(record))
    print(f"Prefect server started for this and later runs: {url.removesuffix('/api')} (UI); stop: trainflow server --stop")
    return url


def _spawn(home: Path) -> tuple[subprocess.Popen, str, Path]:
    """Prefect's server (API, UI, services) on 127.0.0.1 and a free port, logging to PREFECT_HOME; not waited for.
    Run as Prefect runs its own temporary server: uvicorn with Prefect's app factory, which answers ~0.3 s sooner
    than `prefect server start` (no CLI to import first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_UI_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    env.update(PREFECT__SERVER_FINAL="1", PYTHONUNBUFFERED="1")  # (the one app of its process; its log as it happens)
    env.pop("PREFECT_API_URL", None)
    log = home / "trainflow-server.log"
    app = ["--factory", "prefect.server.api.server:create_app", "--lifespan", "on"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", *app, "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # not in this run's process group: Ctrl-C on a run leaves it running
        )
    return proc, url, log


_early: dict[str, tuple] = {}  # PREFECT_HOME -> (held lock, server process, url, log) of start_early()


def start_early() -> None:
    """`trainflow run`, first thing: when no server is configured and the local one is not running, start it now,
    so that its start (seconds) overlaps this process's import of Prefect; prefect_api() then waits for it, or
    stops it should Prefect's settings (read only then) name a server after all. Decided without importing
    Prefect: PREFECT_API_URL or PREFECT_HOME set by the environment, the active profile, a .env or prefect.toml."""
    if os.environ.get("PREFECT_API_URL") or os.environ.get(MODE, "local") != "local":
        return
    if os.environ.get("PREFECT_SERVER_EPHEMERAL_ENABLED", "true").lower() in ("0", "false", "no", "off"):
        return
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    if _configured_elsewhere(home):
        return
    home.mkdir(parents=True, exist_ok=True)
    lock = open(home / f"{RECORD}.lock", "w")  # noqa: SIM115  (held until local_server has the server)
    fcntl.flock(lock, fcntl.LOCK_EX)
    if running_server(home):
        lock.close()
        return
    _early[str(home.resolve())] = (lock, *_spawn(home))


def _configured_elsewhere(home: Path) -> bool:
    """Prefect settings a file may hold that would make the early start wrong (then the run starts it as before):
    a server's URL or key, another home or profiles file, the local server switched off."""
    import tomllib

    keys = ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_API_KEY", "PREFECT_PROFILES_PATH")
    dotenv = Path(".env").read_text(errors="replace") if Path(".env").is_file() else ""
    if any(k in dotenv for k in keys):
        return True
    for path, table in (("prefect.toml", ()), ("pyproject.toml", ("tool", "prefect"))):
        try:
            settings = tomllib.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        for name in table:
            settings = settings.get(name, {})
        api, ephemeral = settings.get("api", {}), settings.get("server", {}).get("ephemeral", {})
        if api.get("url") or api.get("key") or "home" in settings or "profiles_path" in settings or "enabled" in ephemeral:
            return True
    try:
        profiles = tomllib.loads(Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").read_text())
    except (OSError, ValueError):
        return False
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return any(k in profiles.get("profiles", {}).get(active, {}) for k in keys)


def discard_early() -> None:
    """An early-started server this run does not use after all: stopped, its lock released."""
    for lock, proc, _url, _log in _early.values():
        proc.kill()
        proc.wait()
        lock.close()
    _early.clear()


def stop_local_server() -> str:
    """Stop the local server a run left running (`trainflow server --stop`)."""
    import signal

    record = running_server()
    (prefect_home() / RECORD).unlink(missing_ok=True)
    if not record:
        return "no local Prefect server is running"
    try:
        os.killpg(record["pid"], signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 20
    while healthy(record["url"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return f"stopped the Prefect server at {record['url'].removesuffix('/api')}"


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
