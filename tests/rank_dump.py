"""Test helpers for two-process CPU DDP runs: every rank dumps its weights, tests compare ranks."""

import atexit
import os
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

TESTS = Path(__file__).resolve().parent


class DumpWeightsPerRank(pl.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items() if isinstance(v, torch.Tensor)}
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")


class ProcessGroupAtExit(pl.Callback):
    """Dumps, at interpreter exit (after ``distill``'s entry point returned), whether this rank's default
    process group is still alive: a gloo group torn down only during finalisation can abort the process."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer, pl_module):
        path = self.out_dir / f"rank{trainer.global_rank}.pt"
        atexit.register(lambda: torch.save({"alive": torch.tensor(torch.distributed.is_initialized())}, path))
        self.out_dir.mkdir(parents=True, exist_ok=True)


def run_two_ranks(
    args: list[str], cwd: Path, callback: str = "rank_dump.DumpWeightsPerRank", strategy: str = "ddp"
) -> tuple[dict, dict]:
    """``distill <args>`` as two gloo processes with ``callback`` dumping ``rank<r>.pt``; both dumps."""
    out = Path(cwd) / "ranks"
    ddp = [
        f"--trainer.strategy={strategy}",
        "--trainer.devices=2",
        f"--trainer.callbacks+={callback}",
        f"--trainer.callbacks.out_dir={out}",
    ]
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "distill.cli", *args, *ddp],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
