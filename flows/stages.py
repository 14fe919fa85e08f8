"""How the flow runs a stage: a Prefect task named after it, with DVC as its cache, and retries only where a
retry can help."""

from __future__ import annotations

import time
from collections.abc import Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed

from flows.workspace import Workspace
from tasks import timeline
from tasks.errors import InfrastructureError, UserError
from tasks.settings import Settings

STAGE_RETRIES = 2


def infrastructure_failure(_task, _task_run, state) -> bool:
    """Prefect retries a stage (STAGE_RETRIES times) only after an infrastructure failure: a lost Dask worker or
    connection, a timeout. Never after bad data or params (UserError) or a bug (any other traceback), which would
    fail the same way again; and not after training's own relaunches ran out (RestartsExhausted): the train
    stage retries within itself, up to train.max_restarts, so attempts never multiply."""
    from distributed import KilledWorker

    try:
        error = state.result(raise_on_failure=False)
    except Exception as e:
        error = e
    return isinstance(error, (InfrastructureError, KilledWorker, ConnectionError, TimeoutError))


class Stages:
    """Runs each stage as a Prefect task named after it: skipped when DVC finds it up to date, recorded in
    dvc.lock and the DVC cache when it ran. A stage's error stops the run (later stages do not run)."""

    def __init__(self, settings: Settings, ws: Workspace):
        self.settings, self.ws = settings, ws
        self.done: dict[str, dict] = {}

    def __call__(self, stage: Callable, then: Callable | None = None, **kwargs) -> None:
        name = stage.__name__
        state = task(  # type: ignore[call-overload]  # (Prefect's overloads do not cover a bound method with these options)
            self._run,
            name=name,
            cache_policy=NO_CACHE,
            retries=STAGE_RETRIES,
            retry_delay_seconds=5,
            retry_condition_fn=infrastructure_failure,
        )(name, stage, kwargs, return_state=True)
        if then is not None:
            then()  # also when the stage failed (the validation report says why)
        self.done[name] = state.result()

    def _run(self, name: str, stage: Callable, kwargs: dict):
        t0 = time.perf_counter()
        with timeline.phase("dvc status", stage="runner"):
            changes = self.ws.changes(name)
        if not changes:
            return Completed(
                name="Cached",
                message="up to date in DVC",
                data={"status": "cached", "seconds": round(time.perf_counter() - t0, 3)},
            )
        get_run_logger().info("%s: %s", name, changes)
        try:
            with timeline.recording(name):
                stage(self.settings, **kwargs)  # the cwd is the workspace root (or the experiment's worktree)
        except UserError as e:  # bad data or params: the run fails with the message alone (no traceback, no retry)
            return Failed(message=str(e), data=e)
        with timeline.phase("dvc commit", stage="runner"):
            self.ws.commit(name)
        return {"status": "ran", "seconds": round(time.perf_counter() - t0, 3)}
