"""Trainflow's stages: one plain function per stage (python -m tasks.<stage>), shared by the Prefect flow and dvc.yaml."""
