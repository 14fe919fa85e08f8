"""The flow's parameters: params.yaml's settings as the Prefect UI's Custom run form, every field optional.

The form shows what a user tunes per run first: `dataset`, `train`, `evaluate`, `preprocess`, `validate`;
timeouts, checkpointing, Dask and DVC under `advanced`; output paths not at all (they come from params.yaml).
Every field carries its params.yaml value as its default, its description and its bounds (also in words, as
the UI does not show them), so an empty, partial or unchanged form, `prefect deployment run --params` with
one key and the REST API all start a run.

A run's settings are params.yaml as it is when the run starts, with the fields a run sets to a value other
than the form's default laid over it (`settings_for`). So an unchanged form always means params.yaml, even
after params.yaml changed since the deployment was registered; a changed field means what it says. The real
settings models (tasks/settings.py) then check the result, cross-field rules included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from tasks.settings import (
    PARAMS,
    DaskSettings,
    DatasetSettings,
    DvcSettings,
    EvaluateSettings,
    PreprocessSettings,
    Settings,
    TrainSettings,
    ValidateSettings,
    bounds,
    dump_settings,
    load_settings,
    parse_settings,
)

SECTIONS: dict[str, Any] = {
    "dataset": DatasetSettings,
    "train": TrainSettings,
    "evaluate": EvaluateSettings,
    "preprocess": PreprocessSettings,
    "validate": ValidateSettings,
    "dask": DaskSettings,
    "dvc": DvcSettings,
}
FORM = {  # per run, in the order the form shows them
    "dataset": ["source", "sha256", "target", "task", "target_transform", "key", "columns", "slices", "name", "suite"],
    "train": [
        "epochs",
        "lr",
        "batch_size",
        "weight_decay",
        "class_weights",
        "model",
        "hidden",
        "dropout",
        "augment",
        "patience",
        "seed",
        "world_size",
        "launcher",
        "strategy",
        "precision",
        "compile",
        "grad_sync",
        "grad_accum_steps",
        "local_sgd_period",
        "init_from",
        "init_sha256",
        "init_transform",
    ],
    "evaluate": ["primary", "min_improvement", "max_slice_regression", "slice_bins"],
    "preprocess": ["split", "scaler", "n_quantiles", "min_frequency", "max_categories"],
    "validate": ["on_failure", "min_clean_fraction", "drift", "drift_max_mean_shift", "drift_max_psi"],
}
ADVANCED = {
    "train": [
        "checkpoint_every",
        "keep_checkpoints",
        "max_restarts",
        "step_timeout_s",
        "elastic",
        "rejoin_timeout_s",
        "resume_from",
    ],
    "validate": ["in_memory_max_rows", "partition_rows"],
    "preprocess": ["partition_rows"],
    "dask": ["address", "processes"],
    "dvc": ["push"],
}


class Form(BaseModel):
    model_config = ConfigDict(extra="forbid", field_title_generator=lambda name, _: name)


def _optional(annotation) -> Any:
    """X for `X | None`, else None."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if type(None) in get_args(annotation) and len(args) == 1 else None


def form_field(info: FieldInfo, default: Any) -> tuple[Any, Any]:
    """The form's version of a settings field: params.yaml's value as default, bounds in words. `str | None`
    becomes str with "" for None (the UI renders a null branch as 'Property is type None')."""
    allowed = bounds(info)
    description = (info.description or "") + (f" Allowed: {allowed}." if allowed else "")
    if _optional(info.annotation) is str:
        pattern = next((m.pattern for m in info.metadata if getattr(m, "pattern", None)), None)
        empty_or = f"^$|{pattern}" if pattern else None
        return str, Field(default="" if default is None else default, description=description + " Empty: none.", pattern=empty_or)
    return info.annotation, FieldInfo.merge_field_infos(info, default=default, description=description)


def section_form(name: str, section: Any, keys: list[str], values: dict) -> Any:
    fields: dict[str, Any] = {}
    for key in keys:
        info = section.model_fields[key]
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):  # preprocess.split
            nested = section_form(f"{name}_{key}", info.annotation, list(info.annotation.model_fields), values[key])
            fields[key] = (nested, Field(default_factory=nested, description=info.description))
        else:
            fields[key] = form_field(info, values[key])
    doc = (section.__doc__ or "").strip().split("\n\n")[0]
    return create_model(name, __base__=Form, __doc__=doc, **fields)


def advanced_form(values: dict) -> Any:
    parts = {sec: section_form(f"advanced_{sec}", SECTIONS[sec], keys, values[sec]) for sec, keys in ADVANCED.items()}
    fields: dict[str, Any] = {sec: (model, Field(default_factory=model)) for sec, model in parts.items()}
    return create_model(
        "advanced",
        __base__=Form,
        __doc__="Timeouts, checkpointing, restarts, partitioning, Dask and DVC: how a run executes rather than what it trains.",
        **fields,
    )


def forms(params: str | Path = PARAMS) -> dict[str, type[BaseModel]]:
    """The flow's parameter models, in form order, with params.yaml's values as defaults."""
    values = dump_settings(load_settings(params))
    out = {sec: section_form(sec, SECTIONS[sec], keys, values[sec]) for sec, keys in FORM.items()}
    out["advanced"] = advanced_form(values)
    return out


def overrides(given: BaseModel) -> dict:
    """The fields a run set to something other than the form's default (nested sections included)."""
    out = {}
    for key in given.model_fields_set:
        value, default = getattr(given, key), type(given).model_fields[key].get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            sub = overrides(value)
            if sub:
                out[key] = sub
        elif value != default:
            out[key] = value
    return out


def settings_for(parameters: dict[str, BaseModel], root: Path) -> tuple[Settings, dict]:
    """params.yaml now, with the run's overrides laid over it; and the overrides, by dotted key."""
    raw = dump_settings(load_settings(root / PARAMS))
    dotted: dict = {}
    for name, given in parameters.items():
        changes = overrides(given)
        for sec, sub in changes.items() if name == "advanced" else [(name, changes)]:
            for key, value in sub.items():
                if isinstance(value, dict) and key == "split":
                    raw[sec][key].update(value)
                    dotted.update({f"{sec}.{key}.{k}": v for k, v in value.items()})
                    continue
                if value == "" and _optional(SECTIONS[sec].model_fields[key].annotation) is str:
                    value = None
                raw[sec][key] = dotted[f"{sec}.{key}"] = value
    return parse_settings(raw, "the run's parameters", root=root), dotted
