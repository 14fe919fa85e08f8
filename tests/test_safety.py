"""Attacks a careless user, a broken package or anyone who can start a run could make, each on a temporary
copy: nothing outside the stage's own output may change, and each is refused with a message naming the fix."""

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tasks.errors import UserError
from tasks.files import atomic_dir, sha256_file
from tasks.modelpackage import MAX_MEMBERS, open_package
from tasks.settings import dump_settings, load_settings, parse_settings
from tests.conftest import ROOT, copy_repo, parse, sh
from tests.harness import snapshot


@pytest.fixture(scope="module")
def repo(reproduced, tmp_path_factory) -> Path:
    """A git + DVC copy of the project, run once through `dvc repro` (so every output exists)."""
    return copy_repo(reproduced, tmp_path_factory.mktemp("safety") / "repo")


def with_params(repo: Path, **changes) -> dict:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        params[section][key] = value
    return params


OUTSIDE = Path(tempfile.gettempdir()) / "trainflow-outside-the-project"
ATTACKS = [  # (changes, the stage whose CLI is run, what the message must name)
    ({"ingest.out": "data"}, "ingest", "ingest.out and validate.out overlap"),
    ({"package.out_dir": "data"}, "package", "ingest.out and package.out_dir overlap"),
    ({"train.out_dir": "models"}, "train", "train.out_dir and package.out_dir overlap"),
    ({"package.out_dir": "."}, "package", "package.out_dir: . is the project root"),
    ({"package.out_dir": str(OUTSIDE)}, "package", "is outside the project"),
    ({"package.out_dir": "models/production"}, "package", "package.out_dir and evaluate.champion overlap"),
    ({"validate.report": "tasks/ingest.py"}, "validate", "which git tracks"),
    ({"ingest.out": "data/sources/slice.parquet"}, "ingest", "ingest.out overlaps dataset.source"),
    ({"evaluate.champion": ".."}, "promote", "evaluate.champion: .. is outside the project"),
    ({"search.out_dir": str(OUTSIDE)}, "ingest", "search.out_dir: /"),
    ({"search.storage": "data/raw/data.parquet"}, "ingest", "ingest.out and search.storage overlap"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "changes,stage,named",
    ATTACKS,
    ids=[next(iter(a[0].items()))[0] + "=" + str(next(iter(a[0].values())))[-24:] for a in ATTACKS],
)
def test_output_paths_that_would_destroy_data_are_refused(repo, changes, stage, named):
    OUTSIDE.mkdir(exist_ok=True)
    (OUTSIDE / "keep.txt").write_text("not Trainflow's")
    good = (repo / "params.yaml").read_text()
    before = snapshot(repo)
    try:
        (repo / "params.yaml").write_text(yaml.safe_dump(with_params(repo, **changes), sort_keys=False))
        proc = sh(repo, sys.executable, "-m", f"tasks.{stage}", check=False)
    finally:
        (repo / "params.yaml").write_text(good)
    assert proc.returncode == 2 and named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert snapshot(repo) == before
    assert (OUTSIDE / "keep.txt").read_text() == "not Trainflow's"


@pytest.mark.slow
def test_a_directory_trainflow_did_not_write_is_never_replaced(repo, tmp_path):
    """An untracked folder of the user's at an output path: the stage refuses before any work."""
    good = (repo / "params.yaml").read_text()
    mine = repo / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    try:
        (repo / "params.yaml").write_text(yaml.safe_dump(with_params(repo, **{"package.out_dir": "mine"}), sort_keys=False))
        proc = sh(repo, sys.executable, "-m", "tasks.package", check=False)
    finally:
        (repo / "params.yaml").write_text(good)
    assert proc.returncode == 2 and "mine is a directory Trainflow did not write" in proc.stderr
    assert (mine / "notes.txt").read_text() == "mine" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    shutil.rmtree(mine)
    # what Trainflow writes carries the marker, so it can replace it next time
    assert (repo / "models/package/.trainflow-output").exists() and (repo / "data/features/.trainflow-output").exists()


def test_staging_left_by_a_killed_process_is_cleared_and_a_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale, live, foreign = (
        tmp_path / f".out.{host}-{dead}.abc.tmp",
        tmp_path / f".out.{host}-{os.getppid()}.def.tmp",
        tmp_path / f".out.otherhost-{dead}.ghi.tmp",
    )
    for d in (stale, live, foreign):
        d.mkdir()
    with atomic_dir(out) as stage:
        (stage / "x").write_text("x")
    assert not stale.exists() and live.exists() and foreign.exists()  # another host's is never judged here
    assert (out / "x").read_text() == "x" and (out / ".trainflow-output").exists()


@pytest.mark.slow
def test_bad_params_under_dvc_repro_leave_every_output_in_place(repo):
    """DVC used to delete a stage's outputs before running it; they are persist outputs now, replaced only by
    a stage that succeeds."""
    good = (repo / "params.yaml").read_text()
    kept = {
        p: sha256_file(repo / p)
        for p in ("models/train/model.pt", "reports/train/metrics.json", "reports/train/plots/metrics/train/loss.tsv")
    }
    try:
        (repo / "params.yaml").write_text(yaml.safe_dump(with_params(repo, **{"train.epochs": 0}), sort_keys=False))
        proc = sh(repo, "dvc", "repro", check=False)
    finally:
        (repo / "params.yaml").write_text(good)
    assert proc.returncode != 0 and "train.epochs = 0" in proc.stdout + proc.stderr
    assert {p: sha256_file(repo / p) for p in kept} == kept
    assert json.loads(sh(repo, "dvc", "status", "--json").stdout) == {}


@pytest.mark.slow
def test_a_new_source_of_the_same_data_is_recorded_in_the_package(repo):
    good = (repo / "params.yaml").read_text()
    shutil.copy(repo / "data/sources/slice.parquet", repo / "data/sources/copy.parquet")
    try:
        (repo / "params.yaml").write_text(
            yaml.safe_dump(with_params(repo, **{"dataset.source": "data/sources/copy.parquet"}), sort_keys=False)
        )
        assert "package" in json.loads(sh(repo, "dvc", "status", "--json").stdout)
        sh(repo, "dvc", "repro")
        manifest = json.loads((repo / "models/package/manifest.json").read_text())
        assert manifest["data"]["source"] == "data/sources/copy.parquet"
    finally:
        (repo / "params.yaml").write_text(good)
        sh(repo, "dvc", "repro")
        (repo / "data/sources/copy.parquet").unlink()


@pytest.mark.slow
def test_a_flow_cannot_start_while_dvc_repro_runs_a_stage(repo):
    """`dvc repro` lets go of the repo lock while a stage command runs (holding its read/write locks): a flow
    starting then is told the workspace is busy, not given DVC's LockError traceback."""
    from flows.workspace import Workspace

    good = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(
        yaml.safe_dump(with_params(repo, **{"train.epochs": 300, "train.patience": 300}), sort_keys=False)
    )
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    repro = subprocess.Popen(
        ["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "models/train" not in _read(repo / ".dvc/tmp/rwlock"):  # train's command runs
            time.sleep(0.1)
        with (
            pytest.raises(
                UserError, match=r"is busy: another Trainflow run or DVC command holds its lock \(.dvc/tmp/(rw)?lock\)"
            ),
            Workspace(repo).locked(),
        ):
            pass
    finally:
        os.killpg(repro.pid, signal.SIGKILL)  # dvc and the stage command it runs
        repro.wait()
        (repo / "params.yaml").write_text(good)
    sh(repo, "dvc", "repro")  # the workspace as it was


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


# packages ----------------------------------------------------------------------------------------------


@pytest.fixture
def package_copy(packaged, tmp_path) -> Path:
    copy = tmp_path / "pkg"
    shutil.copytree(packaged[2].package.out_dir, copy)
    return copy


def rewrite_manifest(directory: Path, change) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_a_package_holds_only_the_files_its_manifest_lists(package_copy):
    (package_copy / "extra.py").write_text("print('hi')")
    with pytest.raises(UserError, match=r"\['extra.py'\] not listed in manifest.json"):
        open_package(package_copy).__enter__()
    (package_copy / "extra.py").unlink()
    rewrite_manifest(package_copy, lambda m: m.update(files={}))
    with pytest.raises(UserError, match="manifest.json lists no files"):
        open_package(package_copy).__enter__()


def test_onnx_external_data_is_refused_even_when_listed(package_copy):
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    model = onnx.load(str(package_copy / "model.onnx"))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    onnx.save(model, str(package_copy / "model.onnx"))
    rewrite_manifest(
        package_copy,
        lambda m: m["files"].update(
            {"model.onnx": sha256_file(package_copy / "model.onnx"), "weights.bin": sha256_file(package_copy / "weights.bin")}
        ),
    )
    with pytest.raises(UserError, match="stored as ONNX external data, which a package never holds"):
        open_package(package_copy).__enter__()


def test_a_replaced_model_with_a_matching_hash_is_refused_by_the_signature(packaged, tmp_path, monkeypatch):
    from tasks.package import package

    s = packaged[2]
    raw = s.model_dump(by_alias=True)
    raw["package"].update(out_dir=str(tmp_path / "signed"), archive=str(tmp_path / "signed.tar.gz"))
    monkeypatch.setenv("TRAINFLOW_SIGNING_KEY", "k1-from-the-environment")
    package(parse(raw))
    signed = tmp_path / "signed"
    assert (signed / "manifest.sig").exists()
    with open_package(signed) as p:
        assert p.manifest["files"]
    # the attack of the audit: another model.onnx, its hash put into manifest.json
    shutil.copy(signed / "MODEL_CARD.md", tmp_path / "card")
    (signed / "model.onnx").write_bytes((signed / "model.onnx").read_bytes() + b"\0")
    rewrite_manifest(signed, lambda m: m["files"].update({"model.onnx": sha256_file(signed / "model.onnx")}))
    with pytest.raises(UserError, match="manifest.sig does not match manifest.json"):
        open_package(signed).__enter__()
    monkeypatch.setenv("TRAINFLOW_SIGNING_KEY", "another-key")
    with pytest.raises(UserError, match="unsigned package, and TRAINFLOW_SIGNING_KEY is set"):
        open_package(s.package.out_dir).__enter__()


def test_an_archive_bomb_is_refused_before_it_is_written_and_no_temp_dir_is_left(tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("trainflow-package-*"))
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tar:
        info = tarfile.TarInfo("pkg/model.onnx")
        info.size = 200 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(UserError, match="unpacks to more than .* far more than a model package"):
        open_package(bomb).__enter__()
    many = tmp_path / "many.tar.gz"
    with tarfile.open(many, "w:gz") as tar:
        for i in range(MAX_MEMBERS + 1):
            info = tarfile.TarInfo(f"pkg/f{i}")
            tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(UserError, match=f"more than {MAX_MEMBERS} files"):
        open_package(many).__enter__()
    assert set(Path(tempfile.gettempdir()).glob("trainflow-package-*")) == before


def test_predicting_from_an_archive_leaves_no_temp_dir(packaged, tmp_path):
    import pandas as pd

    from tasks.predict import predict_file

    s = packaged[2]
    before = set(Path(tempfile.gettempdir()).glob("trainflow-package-*"))
    pd.read_parquet(Path(s.preprocess.out_dir) / "test_raw").head(50).to_csv(tmp_path / "in.csv", index=False)
    out = predict_file(s.package.archive, tmp_path / "in.csv", tmp_path / "out.parquet")
    assert out["predicted"] + out["rejected"] == 50
    assert set(Path(tempfile.gettempdir()).glob("trainflow-package-*")) == before


# secrets -----------------------------------------------------------------------------------------------

SECRET = "hunter2-s3cr3t"
CREDENTIALED = [
    f"https://alice:{SECRET}@data.example.com/housing.csv",
    f"s3://bucket/housing.csv?X-Amz-Signature={SECRET}",
    f"https://data.example.com/housing.parquet?token={SECRET}",
]


@pytest.mark.slow
@pytest.mark.parametrize("url", CREDENTIALED)
def test_credentials_in_a_source_url_are_refused_and_never_printed(repo, url):
    good = (repo / "params.yaml").read_text()
    before = snapshot(repo)
    try:
        (repo / "params.yaml").write_text(yaml.safe_dump(with_params(repo, **{"dataset.source": url}), sort_keys=False))
        proc = sh(repo, sys.executable, "-m", "tasks.ingest", check=False)
        repro = sh(repo, "dvc", "repro", check=False)
    finally:
        (repo / "params.yaml").write_text(good)
    assert proc.returncode == 2 and "dataset.source" in proc.stderr and "holds" in proc.stderr
    assert "give credentials through the environment" in proc.stderr.lower()
    assert SECRET not in proc.stdout + proc.stderr  # (DVC's own error for the dependency repeats the URL on the terminal)
    assert repro.returncode != 0 and snapshot(repo) == before  # dvc.lock and every output as they were
    assert not any(
        SECRET.encode() in p.read_bytes()
        for p in repo.rglob("*")
        if p.is_file() and ".git" not in p.parts and p.name != "params.yaml"
    )


def test_the_flow_parameter_schema_refuses_credentials_before_a_run_exists():
    """The Prefect server validates UI/API parameters against this schema before it stores a run."""
    import jsonschema

    from tasks.settings import DatasetSettings

    pattern = DatasetSettings.model_json_schema()["properties"]["source"]["pattern"]
    for url in CREDENTIALED:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(url, {"type": "string", "pattern": pattern})
    for fine in ("data/sources/x.parquet", "s3://bucket/x.parquet", "https://host/x.csv?version=2", "gs://b/p/"):
        jsonschema.validate(fine, {"type": "string", "pattern": pattern})


# listening sockets -------------------------------------------------------------------------------------


def listening(pids: set[int]) -> set[tuple[str, int]]:
    found = set()
    for pid in pids:
        try:
            found |= {
                (c.laddr.ip, c.laddr.port)
                for c in psutil.Process(pid).net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            }
        except psutil.Error:
            pass
    return found


def tree() -> set[int]:
    me = psutil.Process()
    return {me.pid} | {p.pid for p in me.children(recursive=True)}


@pytest.mark.parametrize("processes", [False, True])
def test_local_dask_clusters_listen_on_loopback_only(processes):
    from tasks.cluster import local_client

    with local_client(1, 1, processes) as client:
        client.submit(sum, [1, 2]).result()
        found = listening(tree())
    assert found and {ip for ip, _ in found} == {"127.0.0.1"}, found


@pytest.mark.slow
def test_local_ddp_ranks_listen_on_loopback_only(features, tmp_path):
    from tasks.train import train
    from tests.conftest import variant

    s = variant(features, tmp_path, world_size=2, epochs=3)
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.update(listening(tree()))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        train(s)  # the local launcher: 2 rank processes
    finally:
        done.set()
        watcher.join()
    assert len(seen) >= 2 and {ip for ip, _ in seen} == {"127.0.0.1"}, seen  # the rendezvous store and gloo's pairs


@pytest.mark.slow
def test_the_temporary_prefect_server_listens_on_loopback_only():
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    try:
        found = listening({server.server_process.pid})
        assert found and {ip for ip, _ in found} == {"127.0.0.1"}, found
    finally:
        server.stop()


# smaller -----------------------------------------------------------------------------------------------


def test_a_model_too_large_for_the_machine_is_refused_before_training(features):
    from tasks.training.data import check_inputs
    from tests.conftest import variant

    s = variant(features, Path(tempfile.mkdtemp(dir=Path(features.ingest.out).parents[2])), hidden=[65536, 65536, 65536])
    with pytest.raises(
        UserError,
        match=r"train.hidden=\[65536, 65536, 65536\] makes a mlp of [\d,]+ parameters, about .* GiB "
        r"to train .* lower train.hidden",
    ):
        check_inputs(s)
    raw = dump_settings(load_settings(ROOT / "params.yaml"))
    raw["train"]["hidden"] = [1_000_000, 1_000_000]
    with pytest.raises(UserError, match=r"train.hidden.0 = 1000000: Input should be less than or equal to 65536"):
        parse_settings(raw, root=ROOT)


def test_a_suite_with_a_python_tag_is_refused_not_run(tmp_path):
    from tasks.validation.suite import load_suite

    suite = tmp_path / "suite.yaml"
    suite.write_text("columns: !!python/object/apply:os.system ['echo pwned > %s']\n" % (tmp_path / "pwned"))
    with pytest.raises(UserError, match="is not a plain YAML suite"):
        load_suite(suite)
    assert not (tmp_path / "pwned").exists()


def test_run_names_never_become_paths():
    from flows.workspace import experiment_name

    run_id = "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert experiment_name("x/../../../../data", run_id) == "prefect-x-data-0f8fad5b"
    assert experiment_name("nightly run", run_id) == "prefect-nightly-run-0f8fad5b"
    assert experiment_name("..", run_id) == "prefect-run-0f8fad5b"
    for name in ("x/../../../../data", "nightly run", "a" * 300, "-lead", "ü.lock"):
        ref = f"refs/exps/trainflow/{experiment_name(name, run_id)}"
        assert subprocess.run(["git", "check-ref-format", ref]).returncode == 0, ref


def test_digest_of_a_stage_output_ignores_its_marker(tmp_path):
    from tasks.files import sha256_path

    (tmp_path / "a").mkdir()
    (tmp_path / "a/x").write_text("x")
    before = sha256_path(tmp_path / "a")
    (tmp_path / "a/.trainflow-output").write_text("marker")
    assert sha256_path(tmp_path / "a") == before
    assert hashlib.sha256(b"").hexdigest() != before
