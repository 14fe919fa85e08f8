"""Typed settings read from params.yaml, the one home of Trainflow's config.

Every key is declared here with its bounds; an unknown key or a bad value stops with a message that
names the key and says how to fix it. Stages receive the whole `Settings` and read only their sections.
"""

from __future__ import annotations

import os
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.errors import TrainflowError, UserError
from tasks.paths import INPUTS, REPLACED, WRITTEN_INTO

PARAMS = "params.yaml"
MAX_WIDTH = 65536  # of a hidden layer

# A URL with credentials in it (user:password@host, or a token in the query) would be written to dvc.lock,
# the Prefect database and the package. The same rule, for the Prefect server's check of UI/API parameters:
SECRET_QUERY = r"(?:token|access_token|sig|signature|secret|password|passwd|key|apikey|api_key|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential)"
_ANY_CASE = re.sub(r"[a-z]", lambda m: f"[{m[0]}{m[0].upper()}]", SECRET_QUERY)  # JSON Schema regexes have no flags
NO_SECRETS = rf"^(?![A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@)(?![^#]*[?&]{_ANY_CASE}=)"


class Section(BaseModel):
    # hide_input_in_errors: a refused value (a URL with a secret) is not repeated in Prefect's logs
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


ColumnKind = Literal["numeric", "categorical", "datetime", "ignore"]
Task = Literal["regression", "binary", "multiclass"]
MAX_CLASSES = 1000  # labels of a multiclass target

# the metrics evaluate.primary may name, per task, and the one `use` picks when a dataset's task needs another
PRIMARY = {
    "regression": ["rmse", "mae", "r2", "mape", "rmse_transformed"],
    "binary": ["roc_auc", "accuracy", "balanced_accuracy", "f1_macro", "log_loss"],
    "multiclass": ["accuracy", "balanced_accuracy", "f1_macro", "log_loss", "roc_auc"],
}


class ImageSettings(Section):
    """dataset.modality image: how the images are read and the shape the model sees."""

    size: list[Annotated[int, Field(ge=4, le=4096)]] = Field(
        min_length=2,
        max_length=2,
        description="[height, width] every image is resized to (bilinear) in preprocess: the model's input size.",
    )
    channels: Literal[1, 3] = Field(description="1: greyscale, 3: RGB; every image is converted to it.")
    column: str = Field(
        "image",
        description="The column of encoded image bytes (PNG, JPEG, ...) in a Parquet source (dataset.target names its label column); a directory or IDX source is read into columns of these names.",
    )
    split: Literal["hash", "source"] = Field(
        "hash",
        description="hash: each image's split from a hash of its bytes (preprocess.split); source: the source's own test set (the t10k IDX files, a directory's test/ folder, a Parquet column `split` of train/test), train and validation from a hash in preprocess.split's train:val ratio.",
    )
    names: list[str] = Field(
        [], description="IDX sources: the name of label 0, 1, 2, … (empty: the label numbers are the classes)."
    )
    shard_rows: int = Field(
        4096, ge=16, le=1_000_000, description="Images per uint8 shard file that preprocess writes (and the loader streams)."
    )


class DatasetSettings(Section):
    """What to train on: the data, its expectation suite, the target and how each column is used. Adding a
    dataset is a new section like this (data/datasets/ holds the shipped ones) and a suite; no code."""

    name: str = Field(description="A short name for the dataset (shown in reports and the package manifest).")
    modality: Literal["table", "image"] = Field(
        "table",
        description="table: rows of columns (CSV, Parquet); image: labelled images (a directory in class-subfolder layout root/<label>/<file>, a Parquet table of image bytes and labels, or IDX files), with dataset.image (docs/images.md).",
    )
    source: str = Field(
        description="CSV or Parquet file, or a directory of Parquet files (images: a directory of class folders or IDX files, or a Parquet file): a local path or an fsspec URL (s3://, gs://, https://). Credentials come from the environment or fsspec config, never the URL.",
        json_schema_extra={"pattern": NO_SECRETS},
    )
    sha256: str | None = Field(
        description="Expected sha256 of the source (of a directory: see tasks/files.sha256_path); null skips the check.",
        pattern=r"^[0-9a-f]{64}$",
    )
    suite: str = Field(description="Expectation suite (YAML) the raw data must pass.")
    task: Task = Field(
        description="What is predicted: regression (a number), binary (one of two labels) or multiclass (one of several labels; at most MAX_CLASSES)."
    )
    target: str = Field(description="Column to predict; rows where it is missing are left out of training and counted.")
    target_transform: Literal["none", "log", "log1p"] = Field(
        "none",
        description="regression: train on log(target) or log(1 + target) (prices, counts); predictions and metrics stay in the target's units, plus rmse_transformed in the transformed ones.",
    )
    key: list[str] = Field(
        [],
        description="Columns whose values identify a row: a hash of them assigns its split, so appended rows never move old ones. Empty: the feature columns (never the target, so transforming it moves no row).",
    )
    columns: dict[str, ColumnKind] = Field(
        description="Every other column of the data: numeric, categorical (a vocabulary with an out-of-vocabulary bucket), datetime (expanded to year, month, day, weekday, hour) or ignore."
    )
    slices: list[str] = Field(
        [],
        description="Columns the evaluation also scores separately: each category of a categorical column (the 20 most frequent; the rest as 'other'), or evaluate.slice_bins quantile bins of a numeric one.",
    )
    image: ImageSettings | None = Field(
        None, description="modality image: size, channels and how images are read; null for tables."
    )

    @field_validator("source")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        found = credentials_in(value)
        if found:
            raise ValueError(
                f"{found}; it would be written to dvc.lock, the Prefect run and the package. Give credentials "
                "through the environment or fsspec/DVC config (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, "
                "~/.netrc for https) and drop them from the URL"
            )
        return value

    @model_validator(mode="after")
    def _target_and_key(self) -> DatasetSettings:
        if self.target in self.columns:
            raise ValueError(f"the target {self.target!r} is also listed in columns; remove it from columns")
        unknown = [k for k in self.key if k not in self.columns and k != self.target]
        if unknown:
            raise ValueError(f"key columns {unknown} are not in columns; list them there (as ignore if they are not features)")
        unknown = [k for k in self.slices if k not in self.columns or self.columns[k] in ("ignore", "datetime")]
        if unknown:
            raise ValueError(f"slices {unknown} must be numeric or categorical columns of dataset.columns")
        return self

    @model_validator(mode="after")
    def _modality(self) -> DatasetSettings:
        if self.modality == "table":
            if self.image is not None:
                raise ValueError("dataset.image describes images; dataset.modality is table: set dataset.image: null")
            return self
        if self.image is None:
            raise ValueError("dataset.modality=image needs dataset.image (size, channels); see data/datasets/fashion_mnist.yaml")
        if self.task == "regression":
            raise ValueError("dataset.modality=image predicts labels: set dataset.task: multiclass (or binary)")
        extra = [k for k in ("columns", "key", "slices") if getattr(self, k)]
        if extra:
            raise ValueError(f"dataset.{extra[0]} lists table columns; images have none: set dataset.{extra[0]} empty")
        return self


class IngestSettings(Section):
    """Where ingest puts the raw data."""

    out: str = Field(description="Where ingest writes the raw data as Parquet (a DVC output).")


class ValidateSettings(Section):
    """The expectation suite the raw data must pass before anything else runs."""

    out: str = Field(description="The validated rows, as Parquet: what preprocess reads (a DVC output).")
    on_failure: Literal["fail", "quarantine"] = Field(
        description="Row-level failures stop the run (fail) or move the failing rows aside (quarantine). Table-level failures always stop."
    )
    min_clean_fraction: float = Field(
        gt=0, le=1, description="With quarantine: the least fraction of rows that must pass for the run to go on."
    )
    quarantine: str = Field(description="With quarantine: the failing rows, each with its reasons (Parquet).")
    report: str = Field(description="JSON validation report (a DVC metric).")
    report_md: str = Field(description="The same report as markdown: readable offline, in the Prefect UI and in reviews.")
    reference: str = Field(
        description="Statistics of the last accepted data (a DVC output), which the next data is compared with."
    )
    drift: Literal["fail", "warn", "off"] = Field(
        description="What drift beyond the bounds below does: stop the run, only report it, or nothing."
    )
    drift_max_mean_shift: float = Field(
        gt=0, description="Largest accepted move of a numeric column's mean, in reference standard deviations."
    )
    drift_max_psi: float = Field(
        gt=0, description="Largest accepted population stability index of a numeric column (0.1 small, 0.25 large)."
    )
    in_memory_max_rows: int = Field(
        ge=0,
        description="Inputs with more rows (or a directory of Parquet files) are validated per Dask partition, in parallel, with exactly the same results.",
    )
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

    split: SplitSettings
    scaler: Literal["quantile", "standard"] = Field(
        description="Feature scaling fitted on train: quantile (to a normal) or standard (z-score)."
    )
    n_quantiles: int = Field(ge=10, le=100_000, description="Quantiles kept by the quantile scaler.")
    min_frequency: int = Field(
        ge=1,
        description="A category seen fewer times than this in the train split goes to the out-of-vocabulary bucket (with unseen and missing values).",
    )
    max_categories: int = Field(
        ge=2,
        description="A categorical column with more distinct values than this in the train split is refused (declare it ignore, or raise this).",
    )
    partition_rows: int = Field(
        ge=1000,
        description="Rows per piece of work: the input is cut into pieces of whole row groups of at most this many rows (one row group at least), a Dask task each, read in batches of at most this many rows; one output Parquet file per batch and split. Memory: a batch per worker thread.",
    )
    out_dir: str = Field(description="Feature splits, fitted transform and schema (a DVC output).")


class DaskSettings(Section):
    """The Dask cluster validation (of big inputs) and preprocessing run on."""

    address: str = Field(
        description="'local' starts a local cluster (or uses the scheduler in DASK_SCHEDULER_ADDRESS when that is set); or a scheduler address such as tcp://10.0.0.5:8786."
    )
    n_workers: int | None = Field(ge=1, le=1024, description="Workers of the local cluster; null: Dask sizes it to the machine.")
    threads_per_worker: int | None = Field(
        ge=1, le=256, description="Threads per local worker; null: Dask sizes it to the machine."
    )
    processes: bool = Field(
        description="Local workers as separate processes (true) or as threads of the stage's own process (false: starts in a fraction of the time and moves no data between processes; best on a few cores)."
    )


class TrainSettings(Section):
    """The MLP and its DDP training loop."""

    world_size: int = Field(
        ge=1,
        le=1024,
        description="Ranks (gloo on CPU, NCCL on GPU): local processes, Dask workers or torchrun processes, as train.launcher says.",
    )
    launcher: Literal["local", "dask", "torchrun"] = Field(
        description="Where ranks run: local (processes on this host), dask (one rank per worker of the dask.address cluster that declares a GPU resource: dask worker ADDRESS --resources GPU=1), torchrun (the stage under torchrun: started by the stage on this host, or by you on every node for multi-node)."
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        description="ddp: every rank holds the whole model (data parallel); fsdp: parameters, gradients and optimizer state sharded across ranks (FSDP2 fully_shard), for models too large for one device."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        description="auto: bf16 autocast on CUDA, fp32 on CPU; fp32; bf16: autocast to bfloat16 (weights and loss stay fp32)."
    )
    compile: bool = Field(
        description="Compile the model with torch.compile (pays off on GPU for long runs; adds compile time to every run)."
    )
    epochs: int = Field(ge=1, le=100_000, description="Maximum epochs.")
    batch_size: int = Field(ge=1, description="Global batch size, split evenly across ranks.")
    lr: float = Field(gt=0, le=10, description="Peak learning rate of AdamW (see train.schedule).")
    schedule: Literal["cosine", "onecycle", "plateau"] = Field(
        "cosine",
        description="The learning rate over the run: cosine (from train.lr down over train.epochs, per epoch); onecycle (per step: warm up to train.lr over the first 5% of the steps, then cosine down to train.lr/25e4; AdamW's beta1 cycles 0.95-0.85); plateau (train.lr, halved whenever the validation loss has not improved for more than max(1, train.patience // 3) epochs; the decision is printed and each epoch records its lr).",
    )
    weight_decay: float = Field(ge=0, le=1, description="AdamW weight decay.")
    class_weights: Literal["none", "balanced"] = Field(
        "none",
        description="binary and multiclass: none, or balanced (each class's loss weighted by n_rows / (n_classes × its train rows), for rare classes).",
    )
    model: str = Field(
        pattern=r"^(mlp|resmlp|cnn|resnet|[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*)$",
        description="Tables: mlp (feed-forward layers) or resmlp (residual blocks with layer norm; deeper models), both embedding categorical codes. Images: cnn (a 3×3 conv, ReLU and 2×2 max-pool per hidden entry, then a 128-unit dense layer) or resnet (residual blocks of two 3×3 convs with group norm; a block wider than the one before halves the resolution). Or a model of your own, 'package.module:factory': a function (schema, settings) -> torch.nn.Module (docs/training.md; e.g. tasks.training.ft_transformer:build).",
    )
    numeric_embedding: Literal["none", "periodic", "piecewise_linear"] = Field(
        "none",
        description="The built-in models (mlp, resmlp; a factory of your own gets the key in its settings): numeric columns as they are (none), or each embedded to train.embedding_dim values (Gorishniy et al. 2022): piecewise_linear (bins at the train split's quantiles, saved with the model) or periodic (cos/sin of trained frequencies), each then through a linear layer of its own and a ReLU.",
    )
    embedding_bins: int = Field(
        48,
        ge=1,
        le=1024,
        description="numeric_embedding piecewise_linear: bins per numeric column; periodic: frequencies per column.",
    )
    embedding_dim: int = Field(
        32,
        ge=1,
        le=1024,
        description="numeric_embedding: the values each numeric column becomes (the model's input width per column).",
    )
    hidden: list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] = Field(
        min_length=1,
        max_length=64,
        description="mlp: width of each hidden layer; resmlp: the first entry is the width, each entry a block's inner width; cnn: channels of each conv block; resnet: channels of each residual block.",
    )
    dropout: float = Field(ge=0, lt=1, description="Dropout after each hidden layer (cnn, resnet: before the dense layers).")
    augment: Literal["none", "crop_flip"] = Field(
        "none",
        description="Images: none, or crop_flip: each training image shifted by a random crop of the image zero-padded by 1/8 of its size, and flipped left-right with probability 1/2; drawn per global batch from train.seed, the epoch and the step, so it is the same on any number of ranks and after a resume.",
    )
    patience: int = Field(ge=1, description="Stop after this many epochs without a better validation loss.")
    seed: int = Field(ge=0, description="Seed of weights and data order.")
    grad_sync: Literal["allreduce", "fp16", "bf16", "powersgd", "local_sgd"] = Field(
        description="How ranks combine gradients: allreduce (exact), fp16/bf16 (allreduce compressed to 16 bits), powersgd (low-rank compression with error feedback), local_sgd (no gradient sync; parameters averaged every local_sgd_period steps)."
    )
    local_sgd_period: int = Field(ge=1, description="With grad_sync local_sgd: steps between parameter averages.")
    grad_accum_steps: int = Field(
        ge=1,
        description="Micro-batches per step on each rank (gradients accumulated without sync, then synced once): the same step on less memory.",
    )
    keep_checkpoints: int = Field(ge=1, description="Checkpoints kept (oldest deleted first).")
    checkpoint_every: str = Field(
        pattern=r"^[1-9][0-9]* (step|steps|epoch|epochs)$",
        description="How often to checkpoint: 'N steps' or 'N epochs'; bounds the work a failure loses.",
    )
    max_restarts: int = Field(
        ge=0,
        le=100,
        description="Times the whole group of ranks is relaunched from the last checkpoint after an infrastructure failure (a rank killed, a hang).",
    )
    elastic: bool = Field(
        description="dask launcher: when a lost worker has no replacement within rejoin_timeout_s, relaunch on the GPU workers left (the same global batch over fewer ranks) instead of failing the attempt."
    )
    rejoin_timeout_s: float = Field(
        ge=0,
        description="dask launcher: how long a relaunch waits for train.world_size GPU workers (a nanny restarts a killed worker in seconds).",
    )
    step_timeout_s: float = Field(
        gt=0,
        description="A rank that finishes no step (or validation) in this many seconds is hung: its stacks are logged and the group restarts.",
    )
    resume_from: str | None = Field(
        description="A checkpoint file to continue training from (model, optimizer, schedule, data order); null: resume only an interrupted run of the same settings."
    )
    init_from: str | None = Field(
        None,
        description="Warm start: the weights a new run starts from. null: random initialisation; production: the champion (evaluate.champion); a package directory or .tar.gz written by the package stage (verified first; its model.pt); or a checkpoint file of the train stage (model.pt, or checkpoints/step-*.pt; loaded with weights_only). The weights only: the optimizer, schedule and epochs start anew, and the gate still decides promotion. train.resume_from continues a run exactly instead: set one of the two.",
    )
    init_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="With train.init_from, optional: the parent's sha256 (a package: of its manifest.json, the name of a champion's version; a checkpoint: of the file; the run prints it). Set, dvc.lock records it, so preprocess and train rerun when it changes, and a parent that changed behind the same path stops the run. null: the parent is what train.init_from is when the run starts (a scheduled run's production: the champion of the day), recorded in the lineage; DVC reruns for new data or params, not for a new parent alone.",
    )
    init_transform: Literal["reuse", "refit"] = Field(
        "reuse",
        description="With train.init_from a package: reuse (preprocess applies the parent's transform.json instead of fitting one, so every weight keeps its meaning) or refit (a transform fitted on this data; the weights whose shapes still match are loaded and the others start anew, e.g. the embedding of a categorical column whose vocabulary changed, and the first layer when the embeddings' width changed with it; the run lists both). A checkpoint carries no transform: refit.",
    )
    out_dir: str = Field(description="Trained model and checkpoints.")
    log_dir: str = Field(description="dvclive metrics and plots of training.")

    @model_validator(mode="after")
    def _consistent(self) -> TrainSettings:
        if self.init_from and self.resume_from:
            raise ValueError(
                "train.resume_from continues a run exactly (its weights, optimizer, schedule and data order) and "
                "train.init_from starts a new run from a parent's weights: set one of them to null"
            )
        if self.strategy == "fsdp" and self.grad_sync != "allreduce":
            raise ValueError(
                f"grad_sync={self.grad_sync} works with strategy ddp only (a DDP communication hook or "
                "parameter averaging); FSDP reduce-scatters its sharded gradients: set grad_sync: allreduce "
                "or strategy: ddp"
            )
        return self


class EvaluateSettings(Section):
    """Scoring on the held-out test split."""

    out_dir: str = Field(description="Test metrics, predictions and plots.")
    champion: str = Field(
        description="The promoted model package the candidate must beat (replaced on promotion); without one, the candidate must beat predicting the train mean."
    )
    primary: Literal[
        "rmse", "mae", "r2", "mape", "rmse_transformed", "accuracy", "balanced_accuracy", "f1_macro", "log_loss", "roc_auc"
    ] = Field(
        description="The metric the gate compares, in the direction it improves (lower RMSE or log-loss, higher accuracy or ROC-AUC): regression rmse, mae, r2, mape, rmse_transformed (with a target_transform); binary and multiclass accuracy, balanced_accuracy, f1_macro (macro-averaged F1), log_loss, roc_auc (multiclass: macro one-vs-rest)."
    )
    min_improvement: float = Field(
        ge=0,
        lt=1,
        description="Relative improvement of the primary metric over the champion needed to promote (0.01 = 1% better; 0: any improvement).",
    )
    max_slice_regression: float = Field(
        ge=0,
        description="A candidate whose primary metric on any slice (of at least 30 rows) is worse than the champion's by more than this fraction is not promoted.",
    )
    slice_bins: int = Field(ge=2, le=100, description="Quantile bins of a numeric slice column.")


class PackageSettings(Section):
    """The exported, checksummed model package."""

    out_dir: str = Field(description="The self-contained model package (a directory).")
    archive: str = Field(description="The same package as one .tar.gz file.")


class DvcSettings(Section):
    """Artifact storage."""

    push: bool = Field(description="After a run, push data and models to the default DVC remote (dvc remote add -d ...).")


SearchValue = bool | int | float | str


class SearchDimension(Section):
    """One tuned key of search.space."""

    type: Literal["float", "int", "categorical"] = Field(
        description="float or int: a range [low, high]; categorical: one of choices."
    )
    low: float | None = Field(None, description="float, int: the smallest value tried.")
    high: float | None = Field(None, description="float, int: the largest value tried.")
    log: bool = Field(False, description="float, int: sample on a log scale (low must be > 0).")
    choices: list[SearchValue] | None = Field(None, description="categorical: the values tried (at least two).")

    @model_validator(mode="after")
    def _well_formed(self) -> SearchDimension:
        if self.type == "categorical":
            if self.low is not None or self.high is not None or self.log:
                raise ValueError("a categorical takes choices, not low/high/log; remove them")
            if not self.choices or len(set(map(repr, self.choices))) < 2:
                raise ValueError(
                    f"categorical choices={self.choices}: give at least two different values (one value is no search: set it in params.yaml)"
                )
            return self
        if self.choices is not None:
            raise ValueError(f"type {self.type} takes low and high, not choices; use type: categorical")
        if self.low is None or self.high is None:
            raise ValueError(f"type {self.type} needs low and high")
        if self.low >= self.high:
            raise ValueError(f"empty range: low={self.low:g} must be below high={self.high:g}")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"type int needs whole low and high (got {self.low:g}, {self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got {self.low:g})")
        return self


# keys a trial does not tune: where it runs and writes (a trial is one rank of its own, in its own directories)
UNTUNABLE = {
    "train": {
        "world_size",
        "launcher",
        "strategy",
        "out_dir",
        "log_dir",
        "resume_from",
        "max_restarts",
        "elastic",
        "rejoin_timeout_s",
        "step_timeout_s",
        "keep_checkpoints",
        "checkpoint_every",
    },
    "preprocess": {"out_dir", "split", "partition_rows"},
}


class SearchSettings(Section):
    """Hyperparameter search (`trainflow search`, the hyperparameter-search flow): an Optuna study over train.* and preprocess.* keys, its trials on Dask workers (docs/search.md)."""

    n_trials: int = Field(
        ge=1,
        le=100_000,
        description="Trials the study runs in all (completed, pruned and failed ones count; a resumed study runs only the rest).",
    )
    workers: int = Field(
        ge=1,
        le=1024,
        description="Trials at once: local Dask worker processes, one trial each (on the dask.address cluster: one trial per worker, or per GPU resource when its workers declare GPU).",
    )
    seed: int = Field(ge=0, description="Seed of the TPE sampler.")
    metric: Literal["val_rmse", "val_accuracy", "val_loss"] = Field(
        description="The per-epoch validation figure the study optimises (its best epoch per trial) and the pruner compares; val_accuracy is maximised, the others minimised."
    )
    pruner: Literal["median", "asha", "none"] = Field(
        description="Stops unpromising trials early on the per-epoch metric: median (below the median of earlier trials at the same epoch), asha (asynchronous successive halving), none."
    )
    warmup_epochs: int = Field(
        ge=0, description="median: epochs a trial runs before it may be pruned; asha: its minimum resource (epochs, at least 1)."
    )
    startup_trials: int = Field(
        ge=0, description="Trials sampled at random before TPE models the space (and, with median, before any trial is pruned)."
    )
    reduction_factor: int = Field(
        ge=2, le=100, description="asha: the fraction 1/reduction_factor of trials promoted at each rung."
    )
    study: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="The study's name in the storage: the same name resumes it."
    )
    storage: str = Field(
        description="The study's SQLite file (git-ignored), beside the trials' directories: it survives a killed search, which resumes from it."
    )
    out_dir: str = Field(
        description="The search's report (search.md, search.json) and figures (history.png, importances.png); each trial's model and logs are beside search.storage."
    )
    space: dict[str, SearchDimension] = Field(
        min_length=1,
        description="Dotted train.* or preprocess.* keys to tune, each {type: float, int or categorical; low, high and log, or choices}.",
    )

    @field_validator("space")
    @classmethod
    def _tunable(cls, space: dict) -> dict:
        import difflib

        sections: dict[str, type[Section]] = {"train": TrainSettings, "preprocess": PreprocessSettings}
        known = [f"{s}.{k}" for s, model in sections.items() for k in model.model_fields if k not in UNTUNABLE[s]]
        for key in space:
            section, _, name = key.partition(".")
            if section in sections and name in UNTUNABLE[section]:
                raise ValueError(f"{key} is not tunable (where a trial runs or writes); remove it from search.space")
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3)
                hint = f"did you mean {' or '.join(close)}? " if close else ""
                raise ValueError(f"unknown key {key!r}: {hint}search.space takes train.* and preprocess.* keys")
        return space


# the settings that name files (relative to the project root unless absolute or a URL)
PATH_KEYS = INPUTS + REPLACED + WRITTEN_INTO


class Settings(Section):
    dataset: DatasetSettings
    ingest: IngestSettings
    validate_: ValidateSettings = Field(alias="validate")
    preprocess: PreprocessSettings
    dask: DaskSettings
    train: TrainSettings
    evaluate: EvaluateSettings
    package: PackageSettings
    dvc: DvcSettings
    search: SearchSettings

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, hide_input_in_errors=True)

    @model_validator(mode="after")
    def _fits_the_task(self) -> Settings:
        task, d = self.dataset.task, self.dataset
        if self.evaluate.primary not in PRIMARY[task]:
            raise ValueError(
                f"evaluate.primary={self.evaluate.primary} does not score a {task} model (dataset.task={task}); "
                f"choose one of {PRIMARY[task]}"
            )
        if self.evaluate.primary == "rmse_transformed" and d.target_transform == "none":
            raise ValueError("evaluate.primary=rmse_transformed needs a dataset.target_transform (log or log1p); choose rmse")
        if task != "regression" and d.target_transform != "none":
            raise ValueError(
                f"dataset.target_transform={d.target_transform} transforms a number; dataset.task={task} predicts labels: set it to none"
            )
        if task == "regression" and self.train.class_weights != "none":
            raise ValueError("train.class_weights=balanced weights classes; dataset.task=regression has none: set it to none")
        return self

    @model_validator(mode="after")
    def _fits_the_modality(self) -> Settings:
        image, model = self.dataset.modality == "image", self.train.model
        if image and model in ("mlp", "resmlp"):
            raise ValueError(
                f"train.model={model} is a model of table columns; dataset.modality=image: set train.model: cnn or resnet"
            )
        if not image and model in ("cnn", "resnet"):
            raise ValueError(f"train.model={model} is a model of images; dataset.modality=table: set train.model: mlp or resmlp")
        if not image and self.train.augment != "none":
            raise ValueError(
                f"train.augment={self.train.augment} augments images; dataset.modality=table: set train.augment: none"
            )
        return self

    @model_validator(mode="after")
    def _search_values(self) -> Settings:
        """Both ends of each search range, and each choice, must be a valid value of its key."""
        for key, d in self.search.space.items():
            section, name = key.split(".", 1)
            current = getattr(self, section)
            ends: list[Any] = [d.low, d.high] if d.type == "float" else [int(d.low or 0), int(d.high or 0)]
            for value in d.choices if d.choices is not None else ends:
                try:
                    type(current).model_validate(current.model_dump() | {name: value})
                except ValidationError as e:
                    reason = e.errors()[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(f"search.space.{key}: {value!r} is not a valid {key} ({reason}); fix the range") from None
        return self

    @model_validator(mode="after")
    def _cluster_for_dask_launcher(self) -> Settings:
        if self.train.launcher == "dask" and self.dask.address == "local" and not os.environ.get("DASK_SCHEDULER_ADDRESS"):
            raise ValueError(
                "train.launcher=dask places ranks on the GPU workers of an existing cluster: set dask.address "
                "(or DASK_SCHEDULER_ADDRESS) to its scheduler; for ranks on this machine use train.launcher: local"
            )
        return self


def credentials_in(url: str) -> str | None:
    """What in a URL is a credential (user:password@, or a token-like query parameter), or None."""
    if "://" not in url:
        return None
    parts = urlsplit(url)
    if parts.username or parts.password:
        return "the URL holds credentials (user:password@…)"
    secret = next((k for k, _ in parse_qsl(parts.query) if re.fullmatch(SECRET_QUERY, k, re.I)), None)
    return f"the URL holds a credential in its query ({secret}=…)" if secret else None


def redacted(value):
    """A value safe to print: a URL with its credentials and query replaced by ***."""
    if isinstance(value, str) and credentials_in(value):
        parts = urlsplit(value)
        host = parts.hostname or ""
        return parts._replace(
            netloc=f"***@{host}" if parts.username or parts.password else parts.netloc, query="***" if parts.query else ""
        ).geturl()
    return value


def _fmt_error(err: Any, source: str) -> str:
    key = ".".join(str(p) for p in err["loc"] if p != "__root__") or "(top level)"
    key = key.replace("validate_", "validate")
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'; remove it or fix its spelling"
    if err["type"] == "missing":
        return f"{source}: missing key '{key}'; add it (see the README's params table)"
    value, msg = redacted(err.get("input")), err["msg"].removeprefix("Value error, ")
    if key == "(top level)":  # a rule across sections names its keys itself
        return f"{source}: {msg}"
    shown = "" if isinstance(value, dict) else f" = {value!r}"
    return f"{source}: {key}{shown}: {msg}; fix it in {source}"


def parse_settings(raw: dict, source: str = PARAMS, root: str | Path | None = None) -> Settings:
    """Validate a params mapping and the paths it writes (relative to `root`, default the working directory);
    raise UserError naming every bad key."""
    from tasks.paths import check_paths

    settings = validated(raw, source)
    check_paths(dump_settings(settings), Path(root) if root is not None else Path.cwd())
    return settings


def validated(raw: dict, source: str = PARAMS) -> Settings:
    """Validate a params mapping (keys and values only: for settings already checked, e.g. in a rank)."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections (ingest, validate, ...), got {type(raw).__name__}")
    try:
        return Settings.model_validate(raw)
    except ValidationError as e:
        raise UserError("\n".join(_fmt_error(err, source) for err in e.errors())) from None


def load_settings(path: str | Path = PARAMS) -> Settings:
    """params.yaml as checked settings; its paths are relative to the directory it is in."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run from the project root or pass the path of params.yaml") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    return parse_settings(raw, str(path), root=path.resolve().parent)


def dump_settings(s: Settings) -> dict:
    """Settings as the plain mapping params.yaml holds."""
    return s.model_dump(by_alias=True)


def cli(stage, argv: list[str] | None = None) -> None:
    """The `python -m tasks.<stage>` edge: run a stage on params.yaml (the stage takes no arguments: its settings
    are there); `--help` says so and runs nothing; user errors exit 2 with one message."""
    import argparse

    module = sys.modules[stage.__module__]
    name = module.__spec__.name if module.__spec__ else stage.__module__  # (__main__ under python -m)
    doc = (module.__doc__ or "").strip()
    argparse.ArgumentParser(
        prog=f"python -m {name}",
        description=doc.split("\n")[0],
        epilog="Settings come from params.yaml in the working directory (the project root). The same stage: "
        f"`trainflow stage {name.rsplit('.', 1)[-1]}`, or `dvc repro`.",
    ).parse_args(argv)
    from tasks import timeline

    try:
        settings = load_settings()
        timeline.stage_command(name.rsplit(".", 1)[-1], lambda: stage(settings), settings)
    except TrainflowError as e:  # classified: one message (a bug keeps its traceback)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    finally:
        import gc

        gc.freeze()  # the interpreter's exit then skips a collection over every module (seconds after torch, GX)


def bounds(info) -> str:
    """A field's bounds in words ("> 0, ≤ 10"; items of a list: "each ≥ 1"), for the docs and the UI form."""
    from typing import get_args

    import annotated_types as at

    words = {
        at.Gt: "> {}",
        at.Ge: "≥ {}",
        at.Lt: "< {}",
        at.Le: "≤ {}",
        at.MinLen: "at least {} item(s)",
        at.MaxLen: "at most {} item(s)",
    }
    values = {at.Gt: "gt", at.Ge: "ge", at.Lt: "lt", at.Le: "le", at.MinLen: "min_length", at.MaxLen: "max_length"}

    def word(m) -> str | None:
        return words[type(m)].format(getattr(m, values[type(m)])) if type(m) in words else None

    out = [w for w in map(word, info.metadata) if w]
    items = [
        m for a in get_args(info.annotation) for meta in getattr(a, "__metadata__", ()) for m in getattr(meta, "metadata", [meta])
    ]
    return ", ".join(out + [f"each {w}" for w in map(word, items) if w])


def _kind(annotation) -> str:
    """A field's type in words: the values of a Literal, list/dict shapes, `or null`."""
    from typing import Literal, get_args, get_origin

    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if type(None) in args:
        return " or ".join(_kind(a) for a in args if a is not type(None)) + " or `null`"
    if isinstance(annotation, types.UnionType):
        return " or ".join(_kind(a) for a in args)
    if origin is list:
        return f"list of {_kind(args[0])}"
    if origin is dict:
        return f"mapping of {_kind(args[0])} to {_kind(args[1])}"
    if hasattr(annotation, "__metadata__"):
        return _kind(args[0])
    return getattr(annotation, "__name__", str(annotation))


def _nested(annotation) -> Any:
    """The section model of a nested section (preprocess.split) or an optional one (dataset.image), else None."""
    from typing import get_args

    for a in (annotation, *get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def reference(params: str | Path = PARAMS) -> str:
    """docs/settings.md, generated from the settings' own descriptions and bounds and params.yaml's values
    (`python -m tasks.settings reference > docs/settings.md`; a test fails when the file is stale)."""
    values = dump_settings(load_settings(params))
    lines = [
        "# Settings reference",
        "",
        "Every key of `params.yaml`, generated from `tasks/settings.py` (`python -m tasks.settings "
        "reference > docs/settings.md`). An unknown key or a value out of bounds stops every entry point with a message "
        "naming the key. Change values in params.yaml, with `dvc exp run -S section.key=value`, or in the Prefect UI's "
        "Custom run form (docs/running.md).",
        "",
    ]
    for name, field in Settings.model_fields.items():
        section: Any = field.annotation
        key = field.alias or name
        lines += [
            f"## `{key}`",
            "",
            " ".join((section.__doc__ or "").strip().split("\n\n")[0].split()),
            "",
            "| key | type | allowed | shipped value | meaning |",
            "|---|---|---|---|---|",
        ]
        for sub, info in section.model_fields.items():
            nested = _nested(info.annotation)
            if nested is not None and _kind(info.annotation).startswith("mapping"):  # search.space: per tuned key
                lines.append(
                    f"| `{key}.{sub}` | mapping of str to section | {bounds(info)} | (one per key) | {info.description} |"
                )
                lines += [
                    f"| `{key}.{sub}.KEY.{k}` | {_kind(i.annotation)} | | | {i.description} |"
                    for k, i in nested.model_fields.items()
                ]
                continue
            if nested is not None:
                if values[key][sub] is None:  # an optional section (dataset.image): its row, then its keys
                    lines.append(f"| `{key}.{sub}` | section or `null` | | `null` | {info.description} |")
                for inner, i2 in nested.model_fields.items():
                    shown = f"`{(values[key][sub] or {}).get(inner)}`" if values[key][sub] is not None else "—"
                    lines.append(
                        f"| `{key}.{sub}.{inner}` | {_kind(i2.annotation)} | {bounds(i2)} | {shown} | {i2.description} |"
                    )
                continue
            value = values[key][sub]
            shown = "(one per column)" if isinstance(value, dict) else f"`{value if value is not None else 'null'}`"
            lines.append(f"| `{key}.{sub}` | {_kind(info.annotation)} | {bounds(info)} | {shown} | {info.description} |")
        lines.append("")
    return "\n".join(lines)


def edit_params(text: str, changes: dict) -> str:
    """params.yaml's text with the values of dotted keys changed, and nothing else: comments, order, quoting,
    flow-style lists and the other values stay as the user wrote them (a round trip with ruamel.yaml, the YAML
    library DVC itself uses)."""
    import io

    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    rt = YAML()
    rt.preserve_quotes, rt.width = True, 4096
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    data = rt.load(text)
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = data
        for part in path:
            node = node[part]
        old = node.get(last)
        if isinstance(value, list | dict) and isinstance(old, CommentedSeq | CommentedMap) and old.fa.flow_style():
            value = (CommentedSeq if isinstance(value, list) else CommentedMap)(value)
            value.fa.set_flow_style()
        node[last] = value
    out = io.StringIO()
    rt.dump(data, out)
    return out.getvalue()


def absolute_paths(s: Settings, root: str | Path | None = None) -> Settings:
    """`s` with every relative path made absolute against `root` (default: the working directory), for
    processes that run elsewhere (a Dask worker's working directory is its own)."""
    from tasks.paths import champion_path

    raw, root = dump_settings(s), Path(root or Path.cwd()).resolve()
    for section, key in PATH_KEYS:
        value = raw[section].get(key)
        if value and "://" not in value and not Path(value).is_absolute():
            raw[section][key] = str(champion_path(value, root) if (section, key) == ("evaluate", "champion") else root / value)
    parent = raw["train"]["init_from"]  # (production names the champion, made absolute above)
    if parent and parent != "production" and not Path(parent).is_absolute():
        raw["train"]["init_from"] = str(root / parent)
    return validated(raw)


def main(argv: list[str] | None = None) -> None:
    """python -m tasks.settings reference: print the settings reference (docs/settings.md)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tasks.settings", description="Print the settings reference.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("reference", help="print the settings reference (docs/settings.md) generated from the settings' descriptions")
    ap.parse_args(argv)
    print(reference(), end="")


if __name__ == "__main__":
    main()
