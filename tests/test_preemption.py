"""Preemption: a signal mid-epoch checkpoints atomically and stops; resuming from it is exact."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import CONFIGS, FAST

from distill.callbacks.preemption import PreemptionCheckpoint, save_atomically, slurm_job_id
from distill.cli import main
from distill.data.distributed import EpochShardSampler, ResumableLoader
from distill.models import create_model

TESTS = Path(__file__).resolve().parent
STOP_AT = 6  # the signal arrives during global step 6, i.e. batch 1 of epoch 1 (5 batches an epoch)


class SignalAtStep(pl.Callback):
    """Test-only: the process signals itself in the middle of training step ``step``."""

    def __init__(self, step: int, signal_name: str):
        self.step, self.signum = step, signal.Signals[signal_name]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def kd_args(teacher: Path, name: str, *extra: str) -> list[str]:
    """Two whole epochs of the digits KD pair, with an LR that changes every step (cosine)."""
    fast = [a for a in FAST if not a.startswith("--trainer.limit_train_batches")]
    return [
        "fit",
        "--config",
        str(CONFIGS / "digits/pair.yaml"),
        "--config",
        str(CONFIGS / "methods/kd.yaml"),
        f"--model.init_args.teacher_weights={teacher}",
        "--trainer.max_epochs=2",
        *fast,
        "--model.init_args.lr_schedule=distill.schedules.CyclicCosine",
        "--model.init_args.lr_schedule.cycle_epochs=[2]",
        f"--trainer.logger.init_args.name={name}",
        *extra,
    ]


def last_ckpt(root: Path, name: str) -> Path:
    return root / f"runs/{name}/version_0/checkpoints/last.ckpt"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A random digits teacher and the uninterrupted run's last checkpoint (shared by the signals)."""
    root = tmp_path_factory.mktemp("straight")
    torch.manual_seed(0)
    teacher = root / "teacher.pt"
    torch.save(create_model("resnet20", num_classes=10, in_chans=1).state_dict(), teacher)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(kd_args(teacher, "straight"))
    finally:
        os.chdir(cwd)
    return teacher, torch.load(last_ckpt(root, "straight"), weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_signal_mid_epoch_then_resume_equals_uninterrupted(in_tmp, straight, signal_name):
    teacher, uninterrupted = straight
    scontrol = in_tmp / "bin/scontrol"  # a fake SLURM that records the requeue request
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {in_tmp / "requeued"}\n')
    scontrol.chmod(0o755)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "SLURM_JOB_ID": "4242",
        "PATH": f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}",
    }
    stop = [
        "--trainer.callbacks+=test_preemption.SignalAtStep",
        f"--trainer.callbacks.step={STOP_AT}",
        f"--trainer.callbacks.signal_name={signal_name}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "distill.cli", *kd_args(teacher, "split", *stop)],
        cwd=in_tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(last_ckpt(in_tmp, "split"), weights_only=True)
    assert ckpt["global_step"] == STOP_AT + 1 and ckpt["epoch"] == 1  # stopped after the signalled step
    assert ckpt["DigitsDataModule"] == {"train_position": {"epoch": 1, "batches": 2}}
    requeued = in_tmp / "requeued"
    assert (requeued.read_text().split() if requeued.exists() else None) == (
        ["requeue", "4242"] if signal_name == "SIGUSR1" else None
    )

    main(kd_args(teacher, "split", f"--ckpt_path={last_ckpt(in_tmp, 'split')}"))
    resumed = torch.load(last_ckpt(in_tmp, "split"), weights_only=True)
    assert resumed["global_step"] == uninterrupted["global_step"] == 10
    assert resumed["state_dict"].keys() == uninterrupted["state_dict"].keys()
    for key, value in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


def test_loader_resumes_after_the_batches_consumed():
    def loader():
        return ResumableLoader(torch.arange(23), batch_size=4, sampler=EpochShardSampler(23, seed=3))

    first = loader()
    first.sampler.set_epoch(2)
    batches = iter(first)
    seen = [next(batches) for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": 3}
    rest = list(batches)

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # Lightning sets the same epoch again: the skip stays
    assert [b.tolist() for b in resumed] == [b.tolist() for b in rest]
    assert resumed.state_dict() == {"epoch": 2, "batches": 6}
    resumed.sampler.set_epoch(3)  # a new epoch starts from its first batch
    assert resumed.state_dict() == {"epoch": 3, "batches": 0}
    assert len(list(resumed)) == 6 and torch.cat(seen + rest).sort().values.tolist() == list(range(23))

    ended = loader()
    ended.load_state_dict({"epoch": 2, "batches": 6})  # a checkpoint written at the end of epoch 2
    ended.sampler.set_epoch(3)
    assert len(list(ended)) == 6


class FailingTrainer:
    """Stands in for a Trainer whose checkpoint write dies halfway."""

    is_global_zero = True

    def save_checkpoint(self, path):
        Path(path).write_bytes(b"half a checkpo")
        raise OSError("disk full")


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"the previous checkpoint")
    with pytest.raises(OSError, match="disk full"):
        save_atomically(FailingTrainer(), last)
    assert last.read_bytes() == b"the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left behind


def test_slurm_job_id_and_signal_names(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    assert slurm_job_id() == "17"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "16")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "16_3"
    with pytest.raises(ValueError, match="unknown signal"):
        PreemptionCheckpoint(signals=["SIGTERN"])
