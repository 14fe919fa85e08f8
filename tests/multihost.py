"""Several "hosts" on this machine, for the multi-host tests and benchmarks: each host a Linux network namespace
with its own hostname, all on a private bridge the harness creates; nothing else is reachable from them.

Run (as root):  python -m tests.multihost            # a scheduler and two GPU-resource workers, a preprocess and a
                                                     # 2-rank dask-launched training across them, timed; then torn down
                python -m tests.multihost --hold     # the same cluster, kept up until Ctrl-C (addresses printed)

The network: a namespace `tfmh<pid>-net` holds the bridge; every host namespace has one veth pair to it, an
address in 10.77.0.0/24 and no route elsewhere, and its own /etc/hosts (`ip netns exec` mounts
/etc/netns/NS/hosts) naming every host; processes run under their own UTS namespace with the host's hostname. So
names resolve and ranks find their interface as on real machines, and a host's link can be cut (`Host.cut`).

How code and data reach the hosts: the code as an installed package, data on a shared path. `installed_project`
pip-installs this checkout (a wheel, not the source tree) into a directory every host puts on PYTHONPATH, beside
the same virtualenv (in production: the same image, or `pip install trainflow` on each node); the workspace lives
at the same absolute path on every host (the filesystem is shared here; in production an NFS/Lustre mount). That
is what the dask launcher requires (workers read the features and rank 0 writes the model at the workspace's
absolute paths; it checks that before training) and what multi-node torchrun is documented with; a DVC remote is
how artifacts travel to a machine without the shared path (tests/test_remotes.py: a fresh clone pulls them).

Everything is torn down on exit, also when a test fails: the processes started (by process group), anything
else left in the namespaces, the namespaces and their /etc/netns entries. Namespaces of a harness whose process
died without cleaning up are removed by the next one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SUBNET = "10.77.0"
PREFIX = "tfmh"


def available() -> str | None:
    """Why namespaces cannot be used here (None: they can): the tests skip with this reason."""
    if os.geteuid() != 0:
        return "multi-host tests need root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "multi-host tests need `ip` (iproute2) and `unshare` (util-linux)"
    probe = f"{PREFIX}probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if made.returncode == 0 else f"`ip netns add` fails here: {made.stderr.strip()}"


def ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")


class Host:
    """One machine: a network namespace with an address on the bridge and a hostname."""

    def __init__(self, net: Network, name: str, octet: int):
        self.net, self.name, self.ip = net, name, f"{SUBNET}.{octet}"
        self.ns = f"{net.prefix}-{name}"

    def argv(self, *cmd: str) -> list[str]:
        """cmd as a process of this host: its network namespace, its hostname."""
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *cmd]

    def env(self, **extra: str) -> dict:
        return self.net.env(**extra)

    def run(self, *cmd: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600, check: bool = True):
        proc = subprocess.run(
            self.argv(*cmd), cwd=cwd or self.net.tmp, env=env or self.env(), capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode:
            raise AssertionError(f"on {self.name}: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def spawn(self, *cmd: str, log: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
        """A long-running process of this host (its own process group), output to LOG under the harness's logs;
        stopped by the harness on exit (or earlier with Network.stop)."""
        with open(self.net.logs / log, "ab") as out:
            proc = subprocess.Popen(
                self.argv(*cmd),
                cwd=cwd or self.net.tmp,
                env=env or self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.net.procs.append(proc)
        return proc

    def python(self, code: str, *args: str, timeout: float = 120, env: dict | None = None):
        """Run a Python snippet here; its last stdout line parsed as JSON."""
        proc = self.run(str(BIN / "python"), "-c", code, *args, timeout=timeout, env=env)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def cut(self) -> None:
        """Pull this host's network cable: its veth goes down (packets are dropped, nobody gets a reset)."""
        ip("link", "set", "eth0", "down", ns=self.ns)

    def restore(self) -> None:
        ip("link", "set", "eth0", "up", ns=self.ns)


class Network:
    """The bridge and the hosts (name -> last octet of 10.77.0.x). Use as a context manager."""

    def __init__(self, hosts: dict[str, int], tmp: Path):
        self.prefix = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.prefix}-net"
        self.tmp, self.logs = tmp, tmp / "logs"
        self.hosts = {name: Host(self, name, octet) for name, octet in hosts.items()}
        self.procs: list[subprocess.Popen] = []
        self.site: Path | None = None  # the installed project (installed_project)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def env(self, **extra: str) -> dict:
        """What every host's processes see: this virtualenv first on PATH, the installed project on PYTHONPATH."""
        env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
        env.pop("DASK_SCHEDULER_ADDRESS", None)
        if self.site is not None:
            env["PYTHONPATH"] = str(self.site)
        return {**env, **extra}

    def __enter__(self) -> Network:
        remove_stale()
        self.logs.mkdir(parents=True, exist_ok=True)
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # a SIGTERM (a timeout, CI cancelling) still cleans up
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
        try:
            self._create()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _create(self) -> None:
        ip("netns", "add", self.switch)
        ip("link", "add", "br0", "type", "bridge", ns=self.switch)
        ip("link", "set", "br0", "up", ns=self.switch)
        names = "".join(f"{h.ip} {h.name}\n" for h in self.hosts.values())
        for h in self.hosts.values():
            ip("netns", "add", h.ns)
            etc = Path("/etc/netns") / h.ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{names}")
            ip("link", "add", h.name, "type", "veth", "peer", "name", "eth0", "netns", h.ns, ns=self.switch)
            ip("link", "set", h.name, "master", "br0", "up", ns=self.switch)
            ip("addr", "add", f"{h.ip}/24", "dev", "eth0", ns=h.ns)
            ip("link", "set", "eth0", "up", ns=h.ns)
            ip("link", "set", "lo", "up", ns=h.ns)

    def stop(self, proc: subprocess.Popen, timeout: float = 20, sig: int = signal.SIGTERM) -> None:
        """Signal a spawned process's group (SIGTERM), SIGKILL it after timeout."""
        for signum, wait in ((sig, timeout), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def __exit__(self, *exc) -> None:
        for proc in self.procs[::-1]:
            self.stop(proc)
        teardown(self.prefix)


def teardown(prefix: str) -> None:
    """Kill whatever still runs in the namespaces named prefix-*, then delete them and their /etc/netns entries."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for ns in [n for n in listed if n.startswith(f"{prefix}-")]:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def remove_stale() -> None:
    """Namespaces left by a harness whose process is gone (it was SIGKILLed before its cleanup ran)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for ns in listed:
        pid = ns[len(PREFIX) :].split("-")[0]
        if ns.startswith(PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            teardown(f"{PREFIX}{pid}")


@contextmanager
def project_network(hosts: dict[str, int], tmp: Path):
    """The hosts as network namespaces with this project installed for them in tmp/site (the tests' `net`)."""
    with Network(hosts, tmp) as net:
        net.site = installed_project(tmp / "site")
        yield net


def installed_project(dest: Path) -> Path:
    """This checkout pip-installed (built as a wheel, no dependencies: those are the virtualenv's) into dest, the
    directory hosts put on PYTHONPATH: the hosts run the installed package, not the source tree."""
    src = dest.parent / f"{dest.name}-src"
    for name in ("tasks", "flows"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--disable-pip-version-check"]
        + ["--target", str(dest), str(src)],
        check=True,
    )
    shutil.rmtree(src)
    return dest


def python_without_project(dest: Path) -> Path:
    """A Python environment with every dependency (this virtualenv's site-packages) but not Trainflow: a host
    where nobody installed the project. Returns its python."""
    if (dest / "bin" / "python").exists():
        return dest / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    site = next((dest / "lib").glob("python3*/site-packages"))
    ours = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "dask").is_dir())
    (site / "dependencies.pth").write_text(ours + "\n")  # a plain path: the project's editable-install hook is not run
    return dest / "bin" / "python"


# A Dask cluster across hosts ---------------------------------------------------------------------------

SCHEDULER_PORT = 8786


@contextmanager
def dask_cluster(
    net: Network, scheduler: str, workers: list[str], bare: tuple[str, ...] = (), port: int = SCHEDULER_PORT, **env: str
):
    """`dask scheduler` on one host and one `dask worker ... --resources GPU=1 --nthreads 1` on each worker host,
    as in production; yields the scheduler's address. Hosts in `bare` run Python without the project
    (python_without_project); `env` is added to every process's environment."""
    address = f"tcp://{scheduler}:{port}"

    def on(host: str, *args: str) -> subprocess.Popen:
        python, host_env = BIN / "python", net.env(**env)
        if host in bare:
            python = python_without_project(net.tmp / "bare")
            host_env.pop("PYTHONPATH", None)
        return net[host].spawn(str(python), "-m", "dask", *args, "--no-dashboard", log=f"{host}-{args[0]}.log", env=host_env)

    procs = [on(scheduler, "scheduler", "--host", scheduler, "--port", str(port))]
    procs += [on(w, "worker", address, "--nthreads", "1", "--resources", "GPU=1") for w in workers]
    try:
        wait_for_workers(net, address, len(workers))
        yield address
    finally:
        for p in procs[::-1]:
            net.stop(p)


WAIT = """
import sys, time
from distributed import Client
deadline = time.time() + float(sys.argv[3])
while True:
    try:
        with Client(sys.argv[1], timeout=5) as c:
            c.wait_for_workers(int(sys.argv[2]), timeout=max(1, deadline - time.time()))
            print(len(c.scheduler_info(n_workers=-1)["workers"]))
        break
    except (OSError, TimeoutError):
        if time.time() > deadline:
            raise
        time.sleep(0.5)
"""


def wait_for_workers(net: Network, address: str, n: int, seconds: float = 90, client: str = "client") -> None:
    net[client].python(WAIT, address, str(n), str(seconds), timeout=seconds + 30)


# the script ---------------------------------------------------------------------------------------------


def demo(hold: bool) -> None:
    """Bring up scheduler + two workers + a client, run preprocess and a 2-rank dask-launched training on the real
    slice from the client, print where each ran and how long it took; tear down."""
    sys.path.insert(0, str(ROOT))
    import yaml

    from tests.conftest import real_slice, small_params

    hosts = {"scheduler": 10, "worker1": 11, "worker2": 12, "client": 20}
    with tempfile.TemporaryDirectory(prefix="trainflow-multihost-") as tmp, Network(hosts, Path(tmp)) as net:
        t0 = time.perf_counter()
        net.site = installed_project(Path(tmp) / "site")
        with dask_cluster(net, "scheduler", ["worker1", "worker2"]) as address:
            print(
                f"up in {time.perf_counter() - t0:.1f} s: scheduler {address}, workers worker1 and worker2 (GPU=1); "
                f"logs in {net.logs}"
            )
            if hold:
                print(f"reach it from a host: ip netns exec {net['client'].ns} {BIN}/python ...; Ctrl-C to tear down")
                signal.sigwait({signal.SIGINT, signal.SIGTERM})
                return
            ws = Path(tmp) / "workspace"
            ws.mkdir()
            real_slice().to_parquet(ws / "source.parquet", index=False)
            raw = small_params(ws, ws / "source.parquet", train__world_size=2, train__launcher="dask", train__epochs=2)
            raw["dask"]["address"] = address
            (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
            env = net.env(PYTHONPATH=str(ROOT))  # the client: a checkout
            for stage in ("ingest", "validate", "preprocess", "train"):
                t = time.perf_counter()
                net["client"].run(str(BIN / "python"), "-m", f"tasks.{stage}", cwd=ws, env=env)
                print(f"{stage}: {time.perf_counter() - t:.1f} s")
            summary = json.loads((ws / "models/train/summary.json").read_text())
            print(f"ranks placed on {summary['placement']}; {summary['epochs'][-1]['samples_per_s']:,.0f} samples/s")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.multihost", description=demo.__doc__)
    ap.add_argument("--hold", action="store_true", help="keep the cluster up until Ctrl-C instead of running the demo")
    args = ap.parse_args()
    reason = available()
    if reason:
        sys.exit(f"error: {reason}")
    demo(args.hold)


if __name__ == "__main__":
    main()
