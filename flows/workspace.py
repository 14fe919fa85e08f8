"""The DVC workspace a flow runs in: DVC decides what is up to date and records what the flow ran.

Prefect runs the stages; DVC stays the one cache. Before a stage the flow asks `dvc status` for it and
skips it when it is up to date; after a stage ran, `dvc commit` records its deps, params and outs in
dvc.lock and puts its outputs in the DVC cache. A Prefect run therefore leaves `dvc status` clean and
`dvc repro` a no-op, and a Prefect run after `dvc repro` skips everything.

Runs whose parameters differ from params.yaml execute in a temporary git worktree of HEAD that shares the
DVC cache, and are saved as a DVC experiment (`dvc exp show`), so params.yaml and the outputs in the
workspace are never rewritten by them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from tasks import timeline
from tasks.errors import UserError
from tasks.settings import PARAMS, Settings, dump_settings, edit_params
from tasks.timeline import CHART, DETAILS, REPORT

REPORTS = [str(REPORT), str(DETAILS), str(CHART)]  # the loop's iteration report, saved with the experiment

# remote options that hold a secret (password, secret_access_key, session_token, passphrase, account_key, ...)
SECRET_OPTION = re.compile(r"password|secret|token|passphrase|_key$")

BUSY = (
    "{root} is busy: another Trainflow run or DVC command holds its lock ({what}). Wait for it to finish and run "
    "again (if no such process is running, delete {what})"
)


class Workspace:
    def __init__(self, root: str | Path):
        from dvc.exceptions import NotDvcRepoError
        from dvc.repo import Repo

        try:
            self.repo = Repo(str(Path(root).resolve()))
        except NotDvcRepoError:
            raise UserError(f"{Path(root).resolve()} is not a DVC repository; run from the Trainflow project root") from None
        self.root = Path(self.repo.root_dir)
        self._status: dict[str, list] | None = None  # DVC's status of every stage, asked once
        self._ran = False

    @contextmanager
    def locked(self):
        """Hold DVC's repo lock for the whole run: a second run (or `dvc repro`) fails fast instead of mixing outputs."""
        from dvc.lock import LockError
        from dvc.repo import lock_repo

        stack = ExitStack()
        try:
            stack.enter_context(lock_repo(self.repo))
        except LockError:
            raise UserError(BUSY.format(root=self.root, what=".dvc/tmp/lock")) from None
        with stack:
            # `dvc repro` lets go of the repo lock while a stage command runs, holding only its stage's
            # read/write locks: those count as busy too (else both would write the same outputs)
            holders = self._rwlock_holders()
            if holders:
                raise UserError(BUSY.format(root=self.root, what=".dvc/tmp/rwlock") + f"; held by {holders}")
            yield self

    def _rwlock_holders(self) -> list[str]:
        import psutil  # a dependency of DVC

        path = self.root / ".dvc" / "tmp" / "rwlock"
        try:
            lock = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return []
        infos = [
            i for mode in ("read", "write") for v in (lock.get(mode) or {}).values() for i in (v if isinstance(v, list) else [v])
        ]
        return sorted(
            {f"PID {i['pid']}: {i['cmd']}" for i in infos if int(i["pid"]) != os.getpid() and psutil.pid_exists(int(i["pid"]))}
        )

    def check_graph(self) -> None:
        """DVC's checks of the whole pipeline (overlapping or duplicated outputs, cycles) before any stage runs:
        the flow asks DVC about one stage at a time, which would skip them."""
        from dvc.exceptions import DvcException

        try:
            self.repo.index.check_graph()
        except DvcException as e:
            raise UserError(f"dvc.yaml with these params: {e}") from None

    def changes(self, stage: str) -> list:
        """What DVC finds changed for one stage ([] when it is up to date). DVC is asked about every stage at
        once, the first time; that answer holds until a stage runs, after which a stage is asked about alone."""
        if self._status is None:
            self._status = {name.rsplit(":", 1)[-1]: v for name, v in self.repo.status().items()}
        if not self._ran:
            return self._status.get(stage, [])
        return next(iter(self.repo.status(targets=[self._target(stage)]).values()), [])

    def commit(self, stage: str) -> None:
        self._ran = True
        self.repo.commit(self._target(stage), force=True)

    def _target(self, stage: str) -> str:
        return f"{self.root / 'dvc.yaml'}:{stage}"  # DVC resolves bare stage names against the cwd

    def lock_entry(self, stage: str) -> dict:
        lock = self.root / "dvc.lock"
        stages = yaml.load(lock.read_text(), Loader=yaml.CSafeLoader).get("stages", {}) if lock.exists() else {}
        return stages.get(stage, {})

    def push(self) -> None:
        """Push to the default remote. A failure names the remote and its URL (its password, if the URL has one,
        masked) and DVC's reason with every secret configured for the remote masked, since a backend may echo one."""
        from dvc.config import NoRemoteError
        from dvc.exceptions import DvcException

        try:
            self.repo.push()
        except NoRemoteError:
            raise UserError(
                "dvc.push is true but this repository has no default DVC remote; add one with "
                "`dvc remote add -d storage s3://bucket/path` (or a local directory), or set dvc.push: false"
            ) from None
        except (DvcException, OSError) as e:  # the remote's own errors come through as they are (PermissionError, ...)
            name = self.repo.config["core"].get("remote", "")
            remote = self.repo.config["remote"].get(name, {})
            reason = "; ".join(dict.fromkeys(str(x) for x in (e, e.__cause__) if x))  # DVC's summary, and why
            secrets = [str(v) for k, v in remote.items() if SECRET_OPTION.search(k) and v]
            url = str(remote.get("url", ""))
            if password := urlsplit(url).password:
                secrets.append(password)
            for secret in secrets:
                reason, url = reason.replace(secret, "***"), url.replace(secret, "***")
            raise UserError(
                f"dvc push to remote '{name}' ({url}) failed: {reason}; check the remote's address and credentials "
                f"(dvc remote list; the credentials in .dvc/config.local or the environment)"
            ) from None

    @contextmanager
    def experiment(self, name: str, run_id: str, settings: Settings, changed: dict):
        """A temporary worktree of HEAD's code, with the workspace's dvc.lock and outputs and `settings` as
        its params.yaml; saved as DVC experiment `name` (like `dvc exp run --temp`, stage by stage: whatever ran
        in it committed its stage). The worktree's directory is named by `run_id` (a UUID), never by anything a
        user typed."""
        from dvc.exceptions import CheckoutError

        started = time.time()
        run_id = uuid.UUID(str(run_id)).hex  # refuses anything but a UUID
        path, cwd = self.root / ".dvc" / "tmp" / "trainflow-exps" / run_id, os.getcwd()
        if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=self.root, capture_output=True).returncode:
            raise UserError(
                f"{self.root}: parameters that differ from params.yaml run as a DVC experiment, "
                "which needs a git commit to start from; commit the project first"
            )
        if subprocess.run(["git", "check-ref-format", f"refs/exps/trainflow/{name}"], cwd=self.root).returncode or "/" in name:
            raise UserError(f"experiment name {name!r} is not valid as a git ref; name the run with letters, digits and dashes")
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=self.root, check=True)
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(path), "HEAD"], cwd=self.root, check=True)
        uncached = self._uncached_outputs()
        try:
            (path / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {self.repo.cache.local_cache_dir}\n")
            # start from the workspace's state: its dvc.lock and its uncached outputs (reports, metrics)
            for rel in ["dvc.lock"] + uncached:
                if (self.root / rel).is_dir():
                    shutil.copytree(self.root / rel, path / rel, dirs_exist_ok=True)
                elif (self.root / rel).exists():
                    (path / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(self.root / rel, path / rel)
            # the workspace's params.yaml with the run's values: comments, order and everything else as the user wrote it
            (path / PARAMS).write_text(edit_params((self.root / PARAMS).read_text(), {k: new for k, (_, new) in changed.items()}))
            exp = Workspace(path)
            os.chdir(path)  # DVC's experiment code works on the cwd; we hold the workspace lock meanwhile
            try:
                exp.repo.checkout(force=True)  # the outputs dvc.lock names, from the shared cache; missing ones rerun
            except CheckoutError:
                pass
            timeline.add("dvc experiment", started, time.time(), "runner")  # its worktree (its save comes after the report)
            yield exp
            exp.save_experiment(name, ["dvc.lock", *REPORTS] + uncached)
        finally:
            os.chdir(cwd)
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=self.root, capture_output=True)
            shutil.rmtree(path, ignore_errors=True)

    def save_experiment(self, name: str, include: list[str]) -> str:
        """Save this worktree as DVC experiment `name`, as `dvc exp save --force` would, less its commit of every
        stage again (seconds: each stage that ran here committed itself): a git commit on HEAD of the changed
        tracked files, `include` and dvc.yaml's metrics, params and plots files (git-ignored ones too), under
        refs/exps/<HEAD[:2]>/<HEAD[2:]>/<name>, where `dvc exp show`, `apply` and `branch` find it."""
        from dvc.repo.experiments.executor.base import BaseExecutor

        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=self.root, check=True, capture_output=True, text=True).stdout.strip()

        base = git("rev-parse", "HEAD")
        paths = [p for p in dict.fromkeys(include + BaseExecutor._get_top_level_paths(self.repo)) if (self.root / p).exists()]
        git("add", "--update")
        if paths:
            git("add", "--force", "--", *paths)
        anonymous = not git("config", "--default", "", "user.email")  # (a fresh machine: DVC's save worked there too)
        identity = ["-c", "user.name=Trainflow", "-c", "user.email=trainflow@localhost"] if anonymous else []
        git(*identity, "commit", "--quiet", "--no-verify", "--allow-empty", "-m", f"dvc: commit experiment {name}")
        ref = f"refs/exps/{base[:2]}/{base[2:]}/{name}"
        git("update-ref", ref, "HEAD")
        return ref

    def _uncached_outputs(self) -> list[str]:
        return [os.path.relpath(o.fs_path, self.root) for o in self.repo.index.outs if not o.use_cache]


RUNTIME_SECTIONS = ("dask", "dvc", "search")  # where and how a run executes, the search; no stage output depends on them


def changed_params(settings: Settings, base: Settings) -> dict[str, tuple]:
    """Dotted keys of stage params whose value differs: {key: (params.yaml value, run value)}. A mapping value
    (dataset.columns) is one value; a nested section (preprocess.split) is its keys."""

    def stage_params(s: Settings) -> dict:
        out = {}
        for section, values in dump_settings(s).items():
            if section in RUNTIME_SECTIONS:
                continue
            for key, value in values.items():
                nested = isinstance(value, dict) and key == "split"
                out.update({f"{section}.{key}.{k}": v for k, v in value.items()} if nested else {f"{section}.{key}": value})
        return out

    new, old = stage_params(settings), stage_params(base)
    return {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}


def experiment_name(run_name: str | None, run_id: str) -> str:
    """A DVC experiment name from a flow run: its name as a slug (letters, digits, dashes) and its id's first
    8 hex digits, so two runs of the same name never overwrite each other's experiment."""
    slug = re.sub(r"[^a-z0-9]+", "-", (run_name or "").lower()).strip("-")[:40].strip("-") or "run"
    return f"prefect-{slug}-{uuid.UUID(str(run_id)).hex[:8]}"
