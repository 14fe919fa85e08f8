"""Train the model with PyTorch DDP or FSDP.  Run: python -m tasks.train  (or under torchrun)

The stage's entry: check the inputs, then launch the ranks where train.launcher says (tasks/training/launch.py);
each rank runs the same training loop (tasks/training/loop.py). tasks/training/__init__.py lists the parts.
"""

from __future__ import annotations

import os

from tasks.settings import Settings, cli
from tasks.training.data import check_inputs


def train(s: Settings, on_epoch=None) -> dict:
    """Train on the features of the preprocess stage, reporting each epoch (and to `on_epoch(record)`); returns
    the run's summary."""
    from tasks.training.launch import launch

    check_inputs(s)
    return launch(s, on_epoch)


if __name__ == "__main__":
    from tasks.training.launch import torchrun_rank

    cli(torchrun_rank if "RANK" in os.environ else train)
