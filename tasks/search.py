"""Hyperparameter search: an Optuna study over search.space, each trial a training on a Dask worker.
Run: trainflow search  (the hyperparameter-search flow: flows/search.py)

- This process drives the study: the TPE sampler picks each trial's values (ask), a Dask worker trains it with
  the train stage's loop (one rank, its own directories; with a preprocess.* key, its own features first), and
  the outcome is told back: complete (the metric at the kept epoch), pruned, or failed with its error.
- Each epoch the worker reports search.metric to the study and asks the pruner; a pruned trial stops after
  that epoch and its worker takes the next trial.
- The study lives in search.storage (SQLite). This process beats a heartbeat for the trials in flight; when it
  is killed they go stale, and the next search on the same study fails them and runs each again once
  (RetryHeartbeatStaleTrialCallback), then runs only the trials still missing from search.n_trials.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from tasks.errors import UserError
from tasks.files import replace_dir, write_json
from tasks.settings import SearchSettings, Settings, absolute_paths, dump_settings, validated

Direction = Literal["minimize", "maximize"]
DIRECTION: dict[str, Direction] = {"val_rmse": "minimize", "val_loss": "minimize", "val_accuracy": "maximize"}
HEARTBEAT_S, GRACE_S = 2, 8  # a trial whose heartbeat is older than GRACE_S is stale (its driver is gone)


def trials_root(cfg: SearchSettings) -> Path:
    """Each trial's model, logs (and features) in trial-NNNN/ here, beside the study's storage (git-ignored)."""
    return Path(cfg.storage).parent / cfg.study


def storage(cfg: SearchSettings, heartbeat: bool = True):
    import optuna

    # heartbeats and their retry callback are "experimental" since Optuna 2.8; said once here, not on every call
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    Path(cfg.storage).parent.mkdir(parents=True, exist_ok=True)
    beats: dict[str, Any] = (
        {
            "heartbeat_interval": HEARTBEAT_S,
            "grace_period": GRACE_S,
            "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        }
        if heartbeat
        else {}
    )
    # workers and this process write the same file: wait for its lock rather than fail
    return optuna.storages.RDBStorage(
        f"sqlite:///{Path(cfg.storage).resolve()}", engine_kwargs={"connect_args": {"timeout": 60}}, **beats
    )


def pruner(cfg: SearchSettings):
    import optuna

    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=cfg.warmup_epochs)
    if cfg.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=max(1, cfg.warmup_epochs), reduction_factor=cfg.reduction_factor
        )
    return optuna.pruners.NopPruner()


def open_study(cfg: SearchSettings, heartbeat: bool = True):
    import optuna

    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.startup_trials)  # constant liar: parallel trials
    study = optuna.create_study(
        storage=storage(cfg, heartbeat),
        study_name=cfg.study,
        sampler=sampler,
        pruner=pruner(cfg),
        direction=DIRECTION[cfg.metric],
        load_if_exists=True,
    )
    if study.direction.name.lower() != DIRECTION[cfg.metric]:
        raise UserError(
            f"search.study={cfg.study} in {cfg.storage} was started to {study.direction.name.lower()} another metric; "
            f"name a new study (search.study) for search.metric={cfg.metric}"
        )
    return study


def distributions(cfg: SearchSettings) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, d in cfg.space.items():
        if d.type == "categorical":
            out[key] = CategoricalDistribution(d.choices or [])
        elif d.type == "int":
            out[key] = IntDistribution(int(d.low or 0), int(d.high or 0), log=d.log)
        else:
            out[key] = FloatDistribution(float(d.low or 0), float(d.high or 0), log=d.log)
    return out


def with_values(s: Settings, values: dict, source: str) -> Settings:
    """`s` with dotted train.* / preprocess.* keys set (checked: a value out of a key's bounds names it)."""
    raw = dump_settings(s)
    for key, value in values.items():
        section, name = key.split(".", 1)
        raw[section][name] = value
    return validated(raw, source)


def trial_settings(s: Settings, values: dict, trial_dir: Path) -> Settings:
    """A trial's settings: the search's values, one rank here, and its own directories (features too when it
    tunes preprocess.*)."""
    raw = dump_settings(absolute_paths(s))
    raw["train"].update(
        world_size=1, launcher="local", out_dir=str(trial_dir / "model"), log_dir=str(trial_dir / "live"), resume_from=None
    )
    if any(k.startswith("preprocess.") for k in values):
        raw["preprocess"]["out_dir"] = str(trial_dir / "features")
    return with_values(validated(raw), values, f"search trial {trial_dir.name}")


# on a worker ------------------------------------------------------------------------------------------


def run_trial(s: Settings, cfg: SearchSettings, trial_id: int, values: dict, trial_dir: str, per_host: int) -> dict:
    """One trial on a Dask worker: (preprocess,) train with the pruner's stop hook; the outcome for the driver."""
    import optuna

    from tasks.training.checkpoint import staging_dir
    from tasks.training.data import check_inputs
    from tasks.training.loop import run_rank

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial = optuna.Trial(open_study(cfg, heartbeat=False), trial_id)
    t = trial_settings(s, values, Path(trial_dir))
    t0 = time.perf_counter()
    if any(k.startswith("preprocess.") for k in values):  # its own features (trial_settings)
        from tasks.preprocess import preprocess

        preprocess(t)
    check_inputs(t)
    out = staging_dir(t.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pruned: list[int] = []

    def stop(record: dict) -> bool:
        trial.report(record[cfg.metric], record["epoch"])
        if trial.should_prune():
            pruned.append(record["epoch"])
        return bool(pruned)

    run_rank(t, 0, 1, 0, init_method="", local_world=per_host, stop=stop)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    replace_dir(out, t.train.out_dir)
    summary = json.loads((Path(t.train.out_dir) / "summary.json").read_text())
    kept = next(e for e in summary["epochs"] if e["epoch"] == summary["best_epoch"])
    return {
        "pruned": bool(pruned),
        "value": kept[cfg.metric],
        "epochs_run": summary["epochs_run"],
        "best_epoch": summary["best_epoch"],
        "seconds": round(time.perf_counter() - t0, 2),
    }


# the driver -------------------------------------------------------------------------------------------


def recover(study) -> list[int]:
    """Trials a killed search left RUNNING: wait until their heartbeat is stale, fail them (each is enqueued
    again once). Returns their numbers. A trial still beating after the grace period has a live driver."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    found = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in found:  # one killed between ask and its first heartbeat has none, and would never go stale
        study._storage.record_heartbeat(trial._trial_id)
    running = {t.number for t in found}
    deadline = time.monotonic() + GRACE_S + 3 * HEARTBEAT_S
    while running and time.monotonic() < deadline:
        fail_stale_trials(study)
        still = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        if not still:
            break
        time.sleep(1)
    return sorted(running - {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))})


def counted(study) -> list:
    """The trials that count toward search.n_trials: every one but those run again after a kill (in flight and
    waiting ones too)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

    trials = study.get_trials(deepcopy=False)
    retried = {Retry.retried_trial_number(t) for t in trials} - {None}
    return [t for t in trials if t.number not in retried]


@contextmanager
def trial_client(s: Settings):
    """(client, slots, resources, trials per host): local worker processes, one trial each; or the dask.address
    cluster: one trial per worker that declares a GPU resource, else one per worker thread."""
    import dask

    from tasks.cluster import check_project, cluster_workers, connect, local_client

    address = s.dask.address if s.dask.address != "local" else dask.config.get("scheduler-address", None)
    if not address:
        with local_client(s.search.workers, 1, processes=True) as client:
            yield client, s.search.workers, None, s.search.workers
        return
    with connect(address, "dask.address" if s.dask.address != "local" else "DASK_SCHEDULER_ADDRESS") as client:
        check_project(client)
        workers = cluster_workers(client)
        gpu = {a: w for a, w in workers.items() if w.get("resources", {}).get("GPU", 0) >= 1}
        chosen = gpu or workers
        hosts = Counter(urlparse(a).hostname for a in chosen)
        slots = len(gpu) if gpu else sum(w.get("nthreads", 1) for w in workers.values())
        yield client, slots, {"GPU": 1} if gpu else None, max(hosts.values())


def search(s: Settings) -> dict:
    """Run the study to search.n_trials trials; its summary (also search.out_dir/search.json)."""
    from optuna.trial import TrialState

    cfg = s.search
    if s.dataset.modality != "table":
        raise UserError("search: trials train on table features; dataset.modality=image is not searched yet")
    reported = {"val_loss", "val_rmse" if s.dataset.task == "regression" else "val_accuracy"}
    if cfg.metric not in reported:
        raise UserError(f"search.metric={cfg.metric} is not reported for dataset.task={s.dataset.task}; choose val_loss")
    # the study and trials at absolute paths: workers, and this process in an experiment's worktree, see them
    cfg = cfg.model_copy(update={"storage": str(Path(cfg.storage).resolve()), "out_dir": str(Path(cfg.out_dir).resolve())})
    study = open_study(cfg)
    if not study.trials:  # a new study's first trial is params.yaml's values: the search starts from what you have
        study.enqueue_trial(current_values(s, cfg))
    recovered = recover(study)
    if recovered:
        print(f"search: trials {recovered} were left running by a killed search; failed and run again once", flush=True)
    there = len([t for t in counted(study) if t.state != TrialState.WAITING])  # waiting ones (retries) run first
    todo = cfg.n_trials - there
    print(f"search: study {cfg.study} ({cfg.storage}): {there} of {cfg.n_trials} trials there, {max(todo, 0)} to run", flush=True)
    t0 = time.perf_counter()
    if todo > 0:
        with trial_client(s) as (client, slots, resources, per_host):
            run_trials(study, s, cfg, todo, client, slots, resources, per_host)
    summary = summarize(study, cfg, round(time.perf_counter() - t0, 2))
    write_json(Path(cfg.out_dir) / "search.json", summary)
    return summary


def current_values(s: Settings, cfg: SearchSettings) -> dict:
    """params.yaml's values of the space's keys, those inside the space (the others the sampler picks)."""
    values, out = dump_settings(s), {}
    for key, d in cfg.space.items():
        section, name = key.split(".")
        value = values[section][name]
        if d.type == "categorical":
            inside = value in (d.choices or [])
        else:
            inside = isinstance(value, int | float) and float(d.low or 0) <= value <= float(d.high or 0)
        if inside:
            out[key] = value
    return out


def run_trials(study, s: Settings, cfg: SearchSettings, todo: int, client, slots: int, resources, per_host: int) -> None:
    """Keep `slots` trials in flight until `todo` more have finished, beating their heartbeats meanwhile."""
    from distributed import wait

    space, flight = distributions(cfg), dict[Any, Any]()
    while todo > 0 or flight:
        while todo > 0 and len(flight) < slots:
            trial = study.ask(space)  # a retry waiting in the study first
            study._storage.record_heartbeat(trial._trial_id)
            where = str(trials_root(cfg) / f"trial-{trial.number:04d}")
            key = f"trial-{cfg.study}-{trial.number}"
            future = client.submit(
                run_trial, s, cfg, trial._trial_id, trial.params, where, per_host, key=key, resources=resources
            )
            flight[future] = trial
            todo -= 1
        try:
            wait(list(flight), timeout=HEARTBEAT_S, return_when="FIRST_COMPLETED")
        except TimeoutError:  # none finished: beat the heartbeats
            pass
        for trial in flight.values():
            study._storage.record_heartbeat(trial._trial_id)
        for future in [f for f in flight if f.done()]:
            finish(study, flight.pop(future), future)


def finish(study, trial, future) -> dict:
    """Tell the study a trial's outcome; a crashed trial is failed with its error, and the study goes on."""
    from optuna.trial import TrialState

    try:
        outcome = future.result()
    except Exception as e:  # the trial's error, whatever it is: recorded, and the search goes on
        error = f"{type(e).__name__}: {e}"
        trial.set_user_attr("error", error)
        study.tell(trial, state=TrialState.FAIL)
        print(f"search: trial {trial.number} failed: {error}", file=sys.stderr, flush=True)
        return {"state": "FAIL", "error": error}
    for k in ("epochs_run", "best_epoch", "seconds"):
        trial.set_user_attr(k, outcome[k])
    if outcome["pruned"]:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, outcome["value"])
    state = "PRUNED" if outcome["pruned"] else "COMPLETE"
    print(
        f"search: trial {trial.number} {state.lower()} after {outcome['epochs_run']} epochs, {outcome['value']:.4f} "
        f"({', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in trial.params.items())})",
        flush=True,
    )
    return dict(outcome, state=state)


def summarize(study, cfg: SearchSettings, seconds: float) -> dict:
    from optuna.trial import TrialState

    trials = counted(study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    return {
        "study": cfg.study,
        "metric": cfg.metric,
        "direction": DIRECTION[cfg.metric],
        "seconds": seconds,
        "states": dict(Counter(t.state.name for t in trials)),
        "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params},
        "trials": [
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "epochs_run": t.user_attrs.get("epochs_run"),
                "seconds": t.user_attrs.get("seconds"),
                **t.params,
                "error": t.user_attrs.get("error"),
                "retry_of": t.system_attrs.get("failed_trial"),
            }
            for t in trials
        ],
    }


def best_values(cfg: SearchSettings) -> dict:
    """The best complete trial's values of the study in search.storage (what `trainflow search --apply` writes)."""
    from optuna.trial import TrialState

    if not Path(cfg.storage).exists():
        raise UserError(f"search: no study at {cfg.storage}; run `trainflow search` first")
    study = open_study(cfg, heartbeat=False)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise UserError(f"search: study {cfg.study} in {cfg.storage} has no complete trial yet; run `trainflow search`")
    return dict(study.best_trial.params)


def figures(study, out: Path, metric: str = "objective") -> dict:
    """optimisation history and parameter importances (PED-ANOVA: numpy only; fANOVA needs scikit-learn, a dev
    dependency here) as PNGs in `out`; the importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator

    from tasks.figures import save

    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning
        ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=metric)
    ax.set_title(f"{metric} of each complete trial, and the best so far")
    save(ax.figure, out / "history.png")
    importances: dict = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError) as e:  # too few complete trials
        print(f"search: no parameter importances ({e})", file=sys.stderr)
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * max(1, len(importances))), dpi=100)
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (PED-ANOVA, normalised)")
    ax.set_title("parameter importances" if importances else "parameter importances: too few complete trials")
    save(fig, out / "importances.png")
    return importances
