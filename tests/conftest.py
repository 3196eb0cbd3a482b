"""Shared fixtures: every test runs on the CPU, offline, one thread per pytest worker. Helpers that
tests import live in ``helpers.py``, ``fakedata.py`` and ``rank_dump.py``."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)  # pytest-xdist runs one worker per core: avoid OpenMP oversubscription


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a fresh directory, so ``runs/`` lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a full CLI fit (minutes on a loaded machine)")
    config.addinivalue_line("markers", "ddp: a multi-process DDP run")
