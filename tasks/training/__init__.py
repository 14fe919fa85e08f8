"""The train stage's parts (tasks/train.py is its entry):

- data.py: the features as tensors on the device, the checks before a run, each rank's slice of a batch;
- objective.py: what is learned: the loss, the target's scaling and the validation metric per task;
- model.py: the model families (mlp, resmlp) and the model file;
- sync.py: how ranks combine gradients (DDP/FSDP wrapping, communication hooks) and where step time goes;
- loop.py: one rank's training, a small state and one readable epoch loop;
- state.py: RNG and whole-model state, gathered across ranks for checkpoints;
- checkpoint.py: the checkpoint contract (what is saved, how it is verified);
- watchdog.py: a rank that stops making progress is hung;
- live.py: rank 0's per-epoch record (dvclive metrics, the progress file);
- progress.py: the stage process reporting that progress to a person;
- launch.py, launch_dask.py: where the ranks run (local processes, torchrun, Dask GPU workers) and restarts.
"""
