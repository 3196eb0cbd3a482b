"""``distill fit|validate`` through ``main(args=[...])`` on the embedded digits."""

import pytest
import torch
from helpers import CONFIGS, FAST
from pytorch_lightning.callbacks import TQDMProgressBar

from distill.cli import PROGRESS_REFRESH_STEPS, build_cli, main
from distill.tools.runs import read_metrics, series


def fit_teacher(epochs: int = 1, *extra: str):
    main(["fit", "--config", str(CONFIGS / "digits/teacher.yaml"), f"--trainer.max_epochs={epochs}", *FAST, *extra])


@pytest.mark.slow
def test_fit_writes_predictable_run_dir_with_metrics(in_tmp):
    fit_teacher(1)
    run = in_tmp / "runs/digits/supervised/resnet20/version_0"
    assert (run / "checkpoints/last.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    rows = read_metrics(run)
    assert any("val/top1" in r and "val/top5" in r for r in rows)
    assert any("lr" in k for r in rows for k in r)


@pytest.mark.slow
def test_resume_continues_from_last_checkpoint(in_tmp):
    fit_teacher(1)
    last = in_tmp / "runs/digits/supervised/resnet20/version_0/checkpoints/last.ckpt"
    fit_teacher(2, f"--ckpt_path={last}")
    resumed = torch.load(last, weights_only=True)  # the resumed run continues in its own directory
    assert resumed["global_step"] == 4  # two epochs of two batches
    assert not (in_tmp / "runs/digits/supervised/resnet20/version_1").exists()
    rows = read_metrics(last.parent.parent)  # the epochs before the resume are still there
    assert [epoch for epoch, _ in series(rows, "val/top1")] == [0, 1]


@pytest.mark.slow
def test_validate_subcommand_reads_checkpoint(in_tmp):
    fit_teacher(1)
    last = in_tmp / "runs/digits/supervised/resnet20/version_0/checkpoints/last.ckpt"
    main(["validate", "--config", str(CONFIGS / "digits/teacher.yaml"), *FAST, f"--ckpt_path={last}"])
    assert (in_tmp / "runs/digits/supervised/resnet20/version_1/metrics.csv").is_file()


def test_unknown_model_lists_known_names(in_tmp):
    with pytest.raises(KeyError, match="unknown model 'resnet21'; known models: .*resnet20"):
        build_cli(["fit", "--config", str(CONFIGS / "digits/teacher.yaml"), "--model.init_args.model=resnet21"])


@pytest.mark.parametrize(
    ("extra", "refresh_rate"),
    [
        ([], PROGRESS_REFRESH_STEPS),
        (["--trainer.callbacks+=TQDMProgressBar", "--trainer.callbacks.refresh_rate=1"], 1),
        (["--trainer.enable_progress_bar=false"], None),
    ],
)
def test_the_default_progress_bar_refreshes_every_few_steps_and_a_given_one_is_kept(in_tmp, extra, refresh_rate):
    args = ["--config", str(CONFIGS / "digits/teacher.yaml"), "--trainer.enable_progress_bar=true", *extra]
    trainer = build_cli(args, run=False).trainer
    bars = [c for c in trainer.callbacks if isinstance(c, TQDMProgressBar)]
    assert [bar.refresh_rate for bar in bars] == ([] if refresh_rate is None else [refresh_rate])
    assert trainer.progress_bar_callback is (bars[0] if bars else None)
