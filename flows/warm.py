"""Imported last by `trainflow serve`'s warm process (flows/serve.py), after the stage modules: does once what
every run forked from it would otherwise do again. Exporting a tiny model to ONNX builds the exporter's table
of ONNX functions (tasks/onnx_export.torchlib_registry) and fills torch.export's and onnxscript's own caches:
a forked run's package stage then takes ~0.8 s instead of ~1.7 s. (Tracing only: no torch kernel runs here, so
no thread pool is started before the fork.)"""

import gc
import tempfile
from pathlib import Path

import torch

from tasks.onnx_export import export

with tempfile.TemporaryDirectory(prefix="trainflow-warm-") as tmp:
    export(
        torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).eval(),
        torch.zeros(2, 4),
        Path(tmp) / "m.onnx",
    )

# what was imported and built here stays for the process's life: out of the collector's sight, so that a full
# collection in a forked run does not walk it all (0.5 s seen in a run's DVC commit), nor touch its pages
gc.freeze()
