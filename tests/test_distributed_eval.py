"""DDP: training shards that keep the ranks in step, evaluation that sees each sample once, SyncBN on the
student only."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import CONFIGS, FAST
from pytorch_lightning.plugins import TorchSyncBatchNorm
from torch import nn

from distill.cli import main
from distill.data.distributed import EpochShardSampler, EvalShardSampler
from distill.methods import OfflineKD
from distill.models import create_model

TESTS = Path(__file__).resolve().parent
DIGITS_TEST = 359  # the digits' test split: odd, so a padding sampler would repeat a sample on 2 ranks


class EvalRecorder(pl.Callback):
    """Test-only: every rank saves the sample indices it evaluated and the epoch's metrics."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_validation_start(self, trainer, pl_module):
        self.indices = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.indices += batch[2].tolist()

    def on_validation_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        torch.save({"indices": self.indices, "metrics": metrics}, self.out_dir / f"rank{trainer.global_rank}.pt")

    on_test_start, on_test_batch_end, on_test_end = on_validation_start, on_validation_batch_end, on_validation_end


def batchnorm_types(net: nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})


def test_train_shards_are_equal_and_single_process_order_is_the_epoch_permutation():
    single = EpochShardSampler(10, seed=5)
    single.set_epoch(3)
    assert list(single) == torch.randperm(10, generator=torch.Generator().manual_seed(8)).tolist()
    shards = [EpochShardSampler(11, seed=5, num_replicas=3, rank=r) for r in range(3)]
    for shard in shards:
        shard.set_epoch(3)
    drawn = [list(shard) for shard in shards]
    assert [len(d) for d in drawn] == [len(s) for s in shards] == [4, 4, 4]  # every rank runs the same steps
    assert set(sum(drawn, [])) == set(range(11))  # one sample padded twice
    assert isinstance(shards[0], torch.utils.data.DistributedSampler)  # so Lightning keeps it


def test_eval_shards_cover_the_split_exactly_once():
    shares = [list(EvalShardSampler(10, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shares] == [len(EvalShardSampler(10, 3, r)) for r in range(3)] == [4, 3, 3]
    assert sorted(sum(shares, [])) == list(range(10))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet20.pt"
    torch.save(create_model("resnet20", num_classes=10, in_chans=1).state_dict(), path)
    return path


def digits_args(command: str, teacher: Path, out: Path, *extra: str) -> list[str]:
    return [
        command,
        "--config",
        str(CONFIGS / "digits/pair.yaml"),
        "--config",
        str(CONFIGS / "methods/kd.yaml"),
        f"--model.init_args.teacher_weights={teacher}",
        *FAST,
        "--trainer.limit_val_batches=1.0",
        "--trainer.callbacks+=test_distributed_eval.EvalRecorder",
        f"--trainer.callbacks.out_dir={out}",
        *extra,
    ]


def run_ddp(args: list[str], cwd: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2"]
    result = subprocess.run(
        [sys.executable, "-m", "distill.cli", *args, *ddp],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def load_ranks(out: Path, n: int) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(n)]


@pytest.mark.ddp
@pytest.mark.parametrize("command", ["validate", "test"])
def test_two_process_evaluation_sees_every_sample_once_and_matches_one_process(in_tmp, teacher, command):
    run_ddp(digits_args(command, teacher, in_tmp / "ddp"), in_tmp)
    main(digits_args(command, teacher, in_tmp / "single"))
    ranks, (single,) = load_ranks(in_tmp / "ddp", 2), load_ranks(in_tmp / "single", 1)
    assert [len(r["indices"]) for r in ranks] == [180, 179]
    assert sorted(ranks[0]["indices"] + ranks[1]["indices"]) == sorted(single["indices"]) == list(range(DIGITS_TEST))
    split = "val" if command == "validate" else "test"
    for key in (f"{split}/top1", f"{split}/top5", f"{split}/teacher_top1"):
        assert (
            ranks[0]["metrics"][key] == ranks[1]["metrics"][key] == pytest.approx(single["metrics"][key], abs=1e-6)
        ), key


def test_sync_batchnorm_converts_the_student_only(teacher):
    """What ``--trainer.sync_batchnorm true`` applies under DDP (Lightning's ``TorchSyncBatchNorm``) reaches
    the registered student only. In-process: DDP refuses SyncBatchNorm on CPU modules."""
    module = OfflineKD(
        student="resnet8", teacher="resnet20", teacher_weights=str(teacher), num_classes=10, in_chans=1, image_size=16
    )
    module = TorchSyncBatchNorm().apply(module)
    assert batchnorm_types(module.student) == ["SyncBatchNorm"]
    assert batchnorm_types(module.teacher) == ["BatchNorm2d"] and not module.teacher.training
