"""Training statistics summed on the device: exact epoch means, torchmetrics' accuracy, the first bad step."""

import math

import pytest
import torch
from helpers import CONFIGS, FAST
from torchmetrics.classification import MulticlassAccuracy

from distill.cli import main
from distill.data import DigitsDataModule
from distill.methods.step_stats import StepStats
from distill.tools.runs import read_metrics


def test_epoch_means_are_sample_weighted_over_the_steps_each_name_appeared_in():
    stats = StepStats()
    stats.start_epoch(0)
    steps = [  # (names, values, batch size): "b" appears from the second step on, as a new phase's term would
        (("a",), [1.5], 32),
        (("a", "b"), [0.25, 3.0], 32),
        (("b", "a"), [1.0, -2.0], 7),
    ]
    for step, (names, values, n) in enumerate(steps):
        stats.add(names, torch.tensor(values), n, step)
        stats.add_lr(0.1 * (step + 1), n)
    means = {k: float(v) for k, v in stats.epoch_means().items()}
    assert means["a"] == pytest.approx((1.5 * 32 + 0.25 * 32 - 2.0 * 7) / 71, rel=1e-6)
    assert means["b"] == pytest.approx((3.0 * 32 + 1.0 * 7) / 39, rel=1e-6)
    assert float(stats.lr_mean()) == pytest.approx((0.1 * 32 + 0.2 * 32 + 0.3 * 7) / 71, rel=1e-6)
    stats.start_epoch(1)
    assert stats.epoch_means() == {} and stats.lr_mean() is None and stats.accuracy() == {}


def test_train_accuracy_is_torchmetrics_micro_top1_and_top5_with_ties():
    generator = torch.Generator().manual_seed(0)
    stats = StepStats()
    top1 = MulticlassAccuracy(12, top_k=1, average="micro")
    top5 = MulticlassAccuracy(12, top_k=5, average="micro")
    for n in (16, 9, 30):
        logits = torch.randint(0, 3, (n, 12), generator=generator).float()  # many ties
        targets = torch.randint(0, 12, (n,), generator=generator)
        stats.add_hits(logits, targets)
        top1.update(logits, targets)
        top5.update(logits, targets)
    accuracy = stats.accuracy()
    assert torch.equal(accuracy["top1"], top1.compute()) and torch.equal(accuracy["top5"], top5.compute())


def test_the_first_non_finite_step_and_its_names_are_kept_until_read():
    stats = StepStats()
    stats.start_epoch(0)
    stats.add(("a", "b"), torch.tensor([1.0, 2.0]), 4, step=0)
    assert stats.first_nonfinite() is None
    stats.add(("a", "b"), torch.tensor([math.inf, 2.0]), 4, step=1)
    stats.add(("grad",), torch.tensor([math.nan]), 0, step=1, summed=False)
    stats.add(("a", "b"), torch.tensor([math.nan, math.nan]), 4, step=2)  # later: does not replace step 1
    stats.start_epoch(1)  # a new epoch clears the sums, not the record
    assert stats.first_nonfinite() == (1, ["a", "grad"])


def test_logged_epoch_means_are_the_exact_means_over_every_batch(in_tmp):
    """``train/loss_epoch`` in metrics.csv = Σ loss_step · batch / Σ batch over every step, re-derived
    in float64 from the per-step rows (logged every step); the last batch of the epoch is smaller."""
    args = ["fit", "--config", str(CONFIGS / "digits/pair.yaml"), "--config", str(CONFIGS / "methods/kd.yaml")]
    fast = [a for a in FAST if not a.startswith("--trainer.limit_train_batches")]
    main([*args, "--model.init_args.teacher_weights=null", *fast, "--trainer.max_epochs=1"])
    rows = read_metrics(next(in_tmp.glob("runs/**/version_0")))
    data = DigitsDataModule(batch_size=32, train_fraction=0.1)
    data.setup("fit")
    total = len(data.train_set)
    sizes = [32] * (total // 32) + ([total % 32] if total % 32 else [])
    assert len(sizes) > 1 and sizes[-1] != 32
    for name in ("train/loss", "train/loss_ce", "train/loss_kd"):
        steps = [r[f"{name}_step"] for r in rows if f"{name}_step" in r]
        epoch = [r[f"{name}_epoch"] for r in rows if f"{name}_epoch" in r]
        assert len(steps) == len(sizes) and len(epoch) == 1
        expected = sum(v * n for v, n in zip(steps, sizes)) / total
        assert math.isclose(epoch[0], expected, rel_tol=1e-6), name
