"""Shared fixtures: every test runs on the CPU, offline, one thread per pytest worker."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)  # pytest-xdist runs one worker per core: avoid OpenMP oversubscription

CONFIGS = Path(__file__).resolve().parent.parent / "lightning_configs"

# Keep CLI runs tiny: a couple of batches, no sanity validation, no progress output.
FAST = [
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.log_every_n_steps=1",
]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a fresh directory, so ``runs/`` lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
