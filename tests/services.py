"""Servers a team runs, each on a host of tests/multihost.py: PostgreSQL (Debian's `postgresql`), a Prefect
server on it, an OpenSSH server (Debian's `openssh-server`) and an S3 API (moto's server) for DVC remotes.

Each is a context manager that starts the real program on its host and stops it on exit (the harness stops
anything left). Data lives in a temporary directory removed on exit.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from tests.multihost import BIN, Host

POSTGRES_VERSIONS = Path("/usr/lib/postgresql")  # Debian: /usr/lib/postgresql/<major>/bin


def pg(tool: str) -> str:
    """A PostgreSQL server program (initdb, postgres) of the newest installed major version."""
    versions = sorted(POSTGRES_VERSIONS.glob("*/bin"), key=lambda p: int(p.parent.name)) if POSTGRES_VERSIONS.is_dir() else []
    found = [str(v / tool) for v in versions[::-1] if (v / tool).exists()] + [shutil.which(tool) or ""]
    if not found[0]:
        raise RuntimeError(f"PostgreSQL's {tool} is missing: apt-get install postgresql (.ci/run does)")
    return found[0]


def as_postgres(*cmd: str) -> list[str]:
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *cmd]


class Postgres:
    """A PostgreSQL server of its own on `host` (port 5432), run as the `postgres` user with a data directory made
    by initdb: user and database `prefect`, password authentication from the bridge's subnet only."""

    def __init__(self, host: Host, password: str = "prefect-test-password"):
        self.host, self.password = host, password
        self.dir = Path(tempfile.mkdtemp(prefix="trainflow-pg-"))  # outside pytest's root-only temporary tree
        self.url = f"postgresql+asyncpg://prefect:{password}@{host.name}:5432/prefect"
        self.proc: subprocess.Popen | None = None
        try:
            self._initdb()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _initdb(self) -> None:
        user = pwd.getpwnam("postgres")
        (self.dir / "pw").write_text(self.password)
        for path in (self.dir, self.dir / "pw"):
            os.chown(path, user.pw_uid, user.pw_gid)
        initdb = [pg("initdb"), "-D", str(self.dir / "data"), "-U", "prefect", f"--pwfile={self.dir / 'pw'}", "-E", "UTF8"]
        initdb += ["--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"]
        made = subprocess.run(as_postgres(*initdb), cwd=self.dir, capture_output=True, text=True)
        if made.returncode:
            raise RuntimeError(f"initdb failed: {made.stderr.strip()}")
        with open(self.dir / "data" / "pg_hba.conf", "a") as hba:
            hba.write("host all all 10.77.0.0/24 scram-sha-256\n")

    def start(self) -> Postgres:
        cmd = as_postgres(pg("postgres"), "-D", str(self.dir / "data"))
        cmd += ["-c", f"listen_addresses={self.host.ip}", "-c", f"unix_socket_directories={self.dir}", "-c", "fsync=off"]
        self.proc = self.host.spawn(*cmd, log=f"{self.host.name}-postgres.log", cwd=self.dir)
        deadline = time.time() + 60
        while subprocess.run(["pg_isready", "-q", "-h", str(self.dir)]).returncode:  # (its Unix socket: no namespace needed)
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"PostgreSQL did not start; see {self.host.net.logs / f'{self.host.name}-postgres.log'}")
            time.sleep(0.2)
        created = self.host.run("createdb", "-h", str(self.dir), "-U", "prefect", "prefect", check=False)
        assert created.returncode == 0 or "already exists" in created.stderr, created.stderr
        return self

    def stop(self) -> None:
        """A fast shutdown (SIGINT): what a database outage looks like to its clients."""
        if self.proc is not None:
            self.host.net.stop(self.proc, sig=signal.SIGINT)
            self.proc = None

    def __enter__(self) -> Postgres:
        try:
            return self.start()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


HEALTHY = """
import json, sys, time, urllib.request
deadline = time.time() + float(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(sys.argv[1] + "/health", timeout=5) as r:
            print(json.dumps(json.load(r)))
            break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.5)
"""


@contextmanager
def prefect_server(host: Host, database_url: str, port: int = 4200, **env: str):
    """`prefect server start` on `host` with its database at database_url; yields the API URL the other hosts use."""
    api = f"http://{host.name}:{port}/api"
    server_env = host.env(
        PREFECT_HOME=str(host.net.tmp / f"prefect-{host.name}"),
        PREFECT_API_DATABASE_CONNECTION_URL=database_url,
        PREFECT_UI_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        **env,
    )
    cmd = [str(BIN / "prefect"), "server", "start", "--host", host.name, "--port", str(port), "--analytics-off"]
    proc = host.spawn(*cmd, log=f"{host.name}-prefect-server.log", env=server_env)
    try:
        assert host.python(HEALTHY, api, "120", timeout=150) is True
        yield api
    finally:
        host.net.stop(proc)


def prefect_env(host: Host, api: str, **extra: str) -> dict:
    """What a Prefect client or worker on `host` needs: the server's API, a home of its own, quick polling."""
    return host.env(
        PREFECT_API_URL=api,
        PREFECT_HOME=str(host.net.tmp / f"prefect-{host.name}"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        **extra,
    )


def api_call(host: Host, api: str, method: str, path: str, body: dict | None = None):
    """One request to the Prefect REST API from `host`; its JSON answer."""
    code = (
        "import json, sys, urllib.request\n"
        "req = urllib.request.Request(sys.argv[1], method=sys.argv[2], headers={'content-type': 'application/json'},"
        " data=None if sys.argv[3] == 'null' else sys.argv[3].encode())\n"
        "print(json.dumps(json.load(urllib.request.urlopen(req, timeout=60))))"
    )
    return host.python(code, api + path, method, json.dumps(body))


class Sshd:
    """Debian's OpenSSH server on `host` (port 22), key authentication only: a host key and a client key made for
    it, the client's public key authorized for root, passwords refused. `known_hosts` is the line a client needs to
    verify the server (no host key check switched off), `key` the client's private key."""

    def __init__(self, host: Host):
        self.host = host
        self.dir = Path(tempfile.mkdtemp(prefix="trainflow-sshd-"))
        self.key = self.dir / "client_key"
        self.proc: subprocess.Popen | None = None
        try:
            self.known_hosts = self._configure()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _configure(self) -> str:
        """The keys, the server's configuration; the known_hosts line of its host key."""
        host = self.host
        for key in (self.dir / "host_key", self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(key)], check=True)
        shutil.copy(self.key.with_suffix(".pub"), self.dir / "authorized_keys")
        public = (self.dir / "host_key.pub").read_text().split()[:2]
        (self.dir / "sshd_config").write_text(
            f"ListenAddress {host.ip}\nHostKey {self.dir / 'host_key'}\nAuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPidFile none\n"
            "Subsystem sftp internal-sftp\nLogLevel VERBOSE\n"
        )
        return f"{host.name},{host.ip} {' '.join(public)}\n"

    def __enter__(self) -> Sshd:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege-separation directory (Debian's package makes it)
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.proc = self.host.spawn(sshd, "-D", "-e", "-f", str(self.dir / "sshd_config"), log=f"{self.host.name}-sshd.log")
        try:
            wait_for_port(self.host, 22, self.proc)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.host.net.stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


MOTO_SETUP = """
import json, sys, urllib.request
import boto3
endpoint, bucket = sys.argv[1], sys.argv[2]
kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="trainflow")
policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
iam.put_user_policy(UserName="trainflow", PolicyName="s3", PolicyDocument=json.dumps(policy))
key = iam.create_access_key(UserName="trainflow")["AccessKey"]
boto3.client("s3", **kw).create_bucket(Bucket=bucket)
auth_on = urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", headers={"content-type": "text/plain"})
urllib.request.urlopen(auth_on).close()  # from now on, every request is checked against IAM
print(json.dumps([key["AccessKeyId"], key["SecretAccessKey"]]))
"""


@contextmanager
def moto_s3(host: Host, bucket: str = "trainflow", port: int = 5000):
    """moto's server (the S3 API DVC's own S3 tests use) on `host`, with `bucket` and an IAM user allowed S3 made
    before authentication is switched on: from then on a request must be signed with that user's key. Yields the
    endpoint URL and the key (access key id, secret)."""
    proc = host.spawn(str(BIN / "moto_server"), "-H", host.ip, "-p", str(port), log=f"{host.name}-moto.log")
    try:
        wait_for_port(host, port, proc)
        endpoint = f"http://{host.name}:{port}"
        key = host.python(MOTO_SETUP, endpoint, bucket)
        yield endpoint, tuple(key)
    finally:
        host.net.stop(proc)


PORT_OPEN = """
import socket, sys, time
deadline = time.time() + float(sys.argv[3])
while True:
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.2)
print("true")
"""


def wait_for_port(host: Host, port: int, proc: subprocess.Popen, seconds: float = 60) -> None:
    if proc.poll() is not None:
        raise RuntimeError(f"{proc.args[-1]} on {host.name} exited at once; see {host.net.logs}")
    host.python(PORT_OPEN, host.ip, str(port), str(seconds), timeout=seconds + 30)
