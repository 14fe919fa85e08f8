"""The training-pipeline flow end to end, as real Prefect flow runs against a temporary Prefect server."""

from pathlib import Path

import pytest

from flows.pipeline import STAGES, training_pipeline
from tasks.files import sha256_file
from tasks.package import load_package
from tasks.settings import UserError
from tests.conftest import real_slice, workspace


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("flow")


def task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.type.value for r in runs}


def test_flow_runs_every_stage_with_two_ddp_ranks(prefect_server, root):
    s = workspace(root, train__world_size=2)
    state = training_pipeline(params_path=str(root / "params.yaml"), return_state=True)
    assert state.is_completed()
    out = state.result()
    assert list(out["seconds"]) == [f.__name__ for f in STAGES]
    assert 0 < out["metrics"]["rmse"] < 0.9 and out["metrics"]["n"] > 300
    pkg = load_package(out["package"])
    assert pkg.manifest["metrics"] == out["metrics"] and pkg.manifest["training"]["world_size"] == 2
    # task runs in the UI carry the stage names
    assert task_runs(state.state_details.flow_run_id) == {f.__name__: "COMPLETED" for f in STAGES}
    assert Path(s.package.out_dir, "model.onnx").exists()


def test_bad_data_stops_the_flow_before_preprocess_and_keeps_the_last_model(prefect_server, root):
    frame = real_slice()
    frame.loc[[1, 2, 3], "AveRooms"] = -1.0
    frame.to_parquet(root / "source.parquet", index=False)  # the same workspace, now fed bad data
    from tasks.settings import load_settings

    s = load_settings(root / "params.yaml")
    kept = {p: sha256_file(p) for p in (Path(s.train.out_dir, "model.pt"), Path(s.package.out_dir, "model.onnx"),
                                        Path(s.preprocess.out_dir, "train/part-00000.parquet"))}
    state = training_pipeline(params_path=str(root / "params.yaml"), return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, UserError)
    assert "column AveRooms: 3 rows" in str(error)
    assert task_runs(state.state_details.flow_run_id) == {"ingest": "COMPLETED", "validate": "FAILED"}
    assert {p: sha256_file(p) for p in kept} == kept
