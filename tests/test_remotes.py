"""Artifacts on a remote, across hosts (tests/multihost.py): `dvc push` from the workspace's host to an SSH remote
(Debian's OpenSSH server on a storage host, key authentication, the server's host key verified) and to an S3 API
(moto's server on an object-storage host, requests signed with an IAM user's key); a fresh `git clone` on a serving
host, which never saw the workspace's cache, pulls the production package and predicts with it. A remote with wrong
credentials is named, and the secret never printed."""

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from tasks.files import sha256_file
from tests.conftest import copy_repo
from tests.multihost import BIN, available, project_network
from tests.services import Sshd, moto_s3

pytestmark = [
    pytest.mark.slow,  # real servers on several hosts: `make test-fast` skips them
    pytest.mark.skipif(available() is not None, reason=str(available())),
]

HOSTS = {"storage": 30, "s3": 31, "client": 20, "serving": 21}
SECRET = "not-the-right-secret-5f2b9c"  # a wrong credential that must never be printed


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    with project_network(HOSTS, tmp_path_factory.mktemp("remotes")) as net:
        yield net


@pytest.fixture(scope="module")
def sshd(net):
    with Sshd(net["storage"]) as sshd:
        yield sshd


@pytest.fixture(scope="module")
def s3(net):
    with moto_s3(net["s3"]) as s3:
        yield s3


def env(net, host: str, sshd: Sshd) -> dict:
    """A host's environment: a home of its own whose known_hosts holds the storage host's key (verified, not
    skipped), the installed project."""
    home = net.tmp / f"home-{host}"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    (home / ".ssh/known_hosts").write_text(sshd.known_hosts)
    return net.env(HOME=str(home))


def dvc(net, host: str, sshd: Sshd, cwd: Path, *args: str, check: bool = True):
    return net[host].run(str(BIN / "dvc"), *args, cwd=cwd, env=env(net, host, sshd), check=check, timeout=300)


def credentials(net, host: str, sshd: Sshd, repo: Path, s3) -> None:
    """Each remote's credentials, in .dvc/config.local (never committed): the SSH key file, the S3 key pair."""
    _, (key_id, secret) = s3
    dvc(net, host, sshd, repo, "remote", "modify", "--local", "ssh", "keyfile", str(sshd.key))
    dvc(net, host, sshd, repo, "remote", "modify", "--local", "s3", "access_key_id", key_id)
    dvc(net, host, sshd, repo, "remote", "modify", "--local", "s3", "secret_access_key", secret)


@pytest.fixture(scope="module")
def repo(net, sshd, s3, reproduced, tmp_path_factory):
    """The reproduced workspace on the client host, its dvc.lock committed, both remotes in .dvc/config (what a
    clone gets) and their credentials in .dvc/config.local (what it does not)."""
    repo = copy_repo(reproduced, tmp_path_factory.mktemp("remotes-ws") / "repo")
    endpoint, _ = s3
    store = net.tmp / "ssh-store"  # on the storage host's disk (the path is only reached through sshd)
    dvc(net, "client", sshd, repo, "remote", "add", "ssh", f"ssh://root@storage{store}")
    dvc(net, "client", sshd, repo, "remote", "add", "s3", "s3://trainflow/store")
    dvc(net, "client", sshd, repo, "remote", "modify", "s3", "endpointurl", endpoint)
    dvc(net, "client", sshd, repo, "remote", "modify", "s3", "region", "us-east-1")
    credentials(net, "client", sshd, repo, s3)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    net["client"].run("git", "add", "-A", cwd=repo)
    net["client"].run(*git, "commit", "-qm", "the pipeline's results and two DVC remotes", cwd=repo)
    return repo


@pytest.mark.parametrize("remote", ["ssh", "s3"])
def test_a_fresh_clone_on_another_host_pulls_the_production_package_from_the_remote_and_predicts(
    net, sshd, s3, repo, remote, tmp_path
):
    t0 = time.perf_counter()
    pushed = dvc(net, "client", sshd, repo, "push", "-r", remote).stdout
    push_s = time.perf_counter() - t0
    assert "pushed" in pushed, pushed

    clone = tmp_path / "clone"
    net["serving"].run("git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "models/package").exists() and not (clone / ".dvc/cache").exists()
    credentials(net, "serving", sshd, clone, s3)
    t0 = time.perf_counter()
    dvc(net, "serving", sshd, clone, "pull", "-r", remote, "package")  # the package stage's outputs
    pull_s = time.perf_counter() - t0

    # the package pulled is the production one: the champion's version is named by its manifest's sha256
    champion = Path((repo / "models/production").readlink()).name
    assert sha256_file(clone / "models/package/manifest.json") == champion
    rows = pd.read_parquet(repo / "data/sources/slice.parquet").head(300)
    rows.to_parquet(tmp_path / "rows.parquet", index=False)
    predict = [str(BIN / "python"), "-m", "tasks.predict"]
    net["serving"].run(
        *predict, "models/package.tar.gz", str(tmp_path / "rows.parquet"), str(tmp_path / "served.parquet"), cwd=clone
    )  # the installed project, as on a serving machine
    net["client"].run(*predict, "models/production", str(tmp_path / "rows.parquet"), str(tmp_path / "champion.parquet"), cwd=repo)
    served, reference = pd.read_parquet(tmp_path / "served.parquet"), pd.read_parquet(tmp_path / "champion.parquet")
    assert len(served) == 300
    pd.testing.assert_frame_equal(served, reference)
    size = sum(p.stat().st_size for p in (clone / ".dvc/cache").rglob("*") if p.is_file())
    print(
        f"{remote} remote: dvc push (the workspace) {push_s:.1f} s; a fresh clone's dvc pull package {pull_s:.1f} s, {size:,} B"
    )


PUSH = """
import json
from flows.workspace import Workspace
from tasks.errors import UserError
try:
    Workspace(".").push()
    print(json.dumps("pushed"))
except UserError as e:
    print(json.dumps(str(e)))
"""


@pytest.mark.parametrize(("remote", "option"), [("ssh", "password"), ("s3", "secret_access_key")])
def test_a_remote_with_wrong_credentials_is_named_and_the_secret_never_printed(net, sshd, s3, repo, remote, option, tmp_path):
    """dvc.push: true at the end of a run (flows/workspace.push), to a default remote whose secret is wrong."""
    ws = copy_repo(repo, tmp_path / "repo")
    dvc(net, "client", sshd, ws, "remote", "default", remote)
    dvc(net, "client", sshd, ws, "remote", "modify", "--local", remote, option, SECRET)
    if remote == "ssh":
        dvc(net, "client", sshd, ws, "remote", "modify", "--local", "--unset", remote, "keyfile")
    proc = net["client"].run(
        str(BIN / "python"), "-c", PUSH, cwd=ws, env=net.env(**{**env(net, "client", sshd), "PYTHONPATH": str(ws)}), check=False
    )
    assert proc.stdout.strip(), proc.stderr
    error = json.loads(proc.stdout.strip().splitlines()[-1])
    assert SECRET not in proc.stdout + proc.stderr
    url = dvc(net, "client", sshd, ws, "remote", "list").stdout.split(remote, 1)[1].split()[0]
    assert error.startswith(f"dvc push to remote '{remote}' ({url}) failed: "), error
    assert "check the remote's address and credentials" in error, error
    print(error)
