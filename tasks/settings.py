"""Typed settings read from params.yaml, the one home of Trainflow's config.

Every key is declared here with its bounds; an unknown key or a bad value stops with a message that
names the key and says how to fix it. Stages receive the whole `Settings` and read only their sections.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS = "params.yaml"


class UserError(Exception):
    """Bad input from the user (data, params, files). Reported as one message, without a traceback."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestSettings(Section):
    """Where the training data comes from."""

    source: str = Field(description="CSV or Parquet file to train on: a local path or an fsspec URL (s3://, gs://, https://).")
    sha256: str | None = Field(description="Expected sha256 of the source file; null skips the check.", pattern=r"^[0-9a-f]{64}$")
    out: str = Field(description="Where ingest writes the raw data as Parquet (a DVC output).")


class ValidateSettings(Section):
    """The expectation suite the raw data must pass before anything else runs."""

    suite: str = Field(description="Expectation suite (YAML) the raw data must pass.")
    out: str = Field(description="The validated rows, as Parquet: what preprocess reads (a DVC output).")
    on_failure: Literal["fail", "quarantine"] = Field(description="Row-level failures stop the run (fail) or move the failing rows aside (quarantine). Table-level failures always stop.")
    min_clean_fraction: float = Field(gt=0, le=1, description="With quarantine: the least fraction of rows that must pass for the run to go on.")
    quarantine: str = Field(description="With quarantine: the failing rows, each with its reasons (Parquet).")
    report: str = Field(description="JSON validation report (a DVC metric).")
    report_md: str = Field(description="The same report as markdown: readable offline, in the Prefect UI and in reviews.")
    reference: str = Field(description="Statistics of the last accepted data (a DVC output), which the next data is compared with.")
    drift: Literal["fail", "warn", "off"] = Field(description="What drift beyond the bounds below does: stop the run, only report it, or nothing.")
    drift_max_mean_shift: float = Field(gt=0, description="Largest accepted move of a numeric column's mean, in reference standard deviations.")
    drift_max_psi: float = Field(gt=0, description="Largest accepted population stability index of a numeric column (0.1 small, 0.25 large).")
    in_memory_max_rows: int = Field(ge=0, description="Inputs with more rows (or a directory of Parquet files) are validated per Dask partition, in parallel, with exactly the same results.")
    partition_rows: int = Field(ge=1, description="Rows per partition when validating on Dask (whole Parquet row groups).")


class SplitSettings(Section):
    """Fractions of rows per split, assigned by a hash of each row (stable when rows are appended)."""

    train: float = Field(gt=0, lt=1, description="Fraction of rows for training.")
    val: float = Field(gt=0, lt=1, description="Fraction of rows for validation / early stopping.")
    test: float = Field(gt=0, lt=1, description="Fraction of rows held out for evaluation.")

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitSettings:
        total = self.train + self.val + self.test
        if abs(total - 1) > 1e-9:
            raise ValueError(f"train + val + test = {total:g}, must be 1; adjust the fractions")
        return self


class PreprocessSettings(Section):
    """Cleaning, splitting and feature scaling on Dask (fitted on the train split only)."""

    target: str = Field(description="Column to predict.")
    split: SplitSettings
    scaler: Literal["quantile", "standard"] = Field(description="Feature scaling fitted on train: quantile (to a normal) or standard (z-score).")
    n_quantiles: int = Field(ge=10, le=100_000, description="Quantiles kept by the quantile scaler.")
    partition_rows: int = Field(ge=1000, description="Target rows per Dask partition and per output Parquet file.")
    out_dir: str = Field(description="Feature splits, fitted transform and schema (a DVC output).")


class DaskSettings(Section):
    """The Dask cluster validation (of big inputs) and preprocessing run on."""

    address: str = Field(description="'local' starts a local cluster; or a scheduler address such as tcp://10.0.0.5:8786.")
    n_workers: int = Field(ge=1, le=1024, description="Workers of the local cluster.")
    threads_per_worker: int = Field(ge=1, le=256, description="Threads per local worker.")
    processes: bool = Field(description="Local workers as separate processes (true) or as threads of the stage's own process (false: starts in a fraction of the time and moves no data between processes; best on a few cores).")


class TrainSettings(Section):
    """The MLP and its DDP training loop."""

    world_size: int = Field(ge=1, le=1024, description="DDP ranks (local processes: gloo on CPU, NCCL on GPU).")
    epochs: int = Field(ge=1, le=100_000, description="Maximum epochs.")
    batch_size: int = Field(ge=1, description="Global batch size, split evenly across ranks.")
    lr: float = Field(gt=0, le=10, description="Peak learning rate of AdamW (cosine decay).")
    weight_decay: float = Field(ge=0, le=1, description="AdamW weight decay.")
    hidden: list[int] = Field(min_length=1, description="Width of each hidden layer of the MLP.")
    dropout: float = Field(ge=0, lt=1, description="Dropout after each hidden layer.")
    patience: int = Field(ge=1, description="Stop after this many epochs without a better validation loss.")
    seed: int = Field(ge=0, description="Seed of weights and data order.")
    keep_checkpoints: int = Field(ge=1, description="Per-epoch checkpoints kept (oldest deleted first).")
    out_dir: str = Field(description="Trained model and checkpoints.")
    log_dir: str = Field(description="dvclive metrics and plots of training.")

    @model_validator(mode="after")
    def _layers_positive(self) -> TrainSettings:
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden={self.hidden}: every layer width must be >= 1")
        return self


class EvaluateSettings(Section):
    """Scoring on the held-out test split."""

    out_dir: str = Field(description="Test metrics, predictions and plots.")


class PackageSettings(Section):
    """The exported, checksummed model package."""

    out_dir: str = Field(description="The self-contained model package.")


class DvcSettings(Section):
    """Artifact storage."""

    push: bool = Field(description="After a run, push data and models to the default DVC remote (dvc remote add -d ...).")


# the settings that name files (relative to the project root unless absolute or a URL)
PATH_KEYS = [("ingest", "source"), ("ingest", "out"), ("validate", "suite"), ("validate", "out"), ("validate", "quarantine"), ("validate", "report"), ("validate", "report_md"), ("validate", "reference"),
             ("preprocess", "out_dir"), ("train", "out_dir"), ("train", "log_dir"),
             ("evaluate", "out_dir"), ("package", "out_dir")]


class Settings(Section):
    ingest: IngestSettings
    validate_: ValidateSettings = Field(alias="validate")
    preprocess: PreprocessSettings
    dask: DaskSettings
    train: TrainSettings
    evaluate: EvaluateSettings
    package: PackageSettings
    dvc: DvcSettings

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _fmt_error(err: dict, source: str) -> str:
    key = ".".join(str(p) for p in err["loc"] if p != "__root__") or "(top level)"
    key = key.replace("validate_", "validate")
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'; remove it or fix its spelling"
    if err["type"] == "missing":
        return f"{source}: missing key '{key}'; add it (see the README's params table)"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    return f"{source}: {key}{shown}: {err['msg']}; fix it in {source}"


def parse_settings(raw: dict, source: str = PARAMS) -> Settings:
    """Validate a params mapping; raise UserError naming every bad key."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections (ingest, validate, ...), got {type(raw).__name__}")
    try:
        return Settings.model_validate(raw)
    except ValidationError as e:
        raise UserError("\n".join(_fmt_error(err, source) for err in e.errors())) from None


def load_settings(path: str | Path = PARAMS) -> Settings:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run from the project root or pass the path of params.yaml") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    return parse_settings(raw, str(path))


def dump_settings(s: Settings) -> dict:
    """Settings as the plain mapping params.yaml holds."""
    return s.model_dump(by_alias=True)


def cli(stage) -> None:
    """The `python -m tasks.<stage>` edge: run a stage on params.yaml; user errors exit 2 with one message."""
    try:
        stage(load_settings())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
