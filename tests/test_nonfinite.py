"""A diverging fit stops with one line naming the step, the non-finite values and the last good
checkpoint; nothing non-finite is ever validated, written, selected as best or exported."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import CONFIGS, FAST

from distill.cli import build_cli
from distill.finite import NonFiniteError
from distill.losses.term import DistillTerm
from distill.tools.export import load_network
from distill.tools.export import main as export
from distill.tools.runs import read_metrics, series

TESTS = Path(__file__).resolve().parent
BATCHES = 4  # training batches an epoch
BAD_STEP = 5  # Boom(at_call=6) is infinite from global step 5 on: epoch 1, its second batch


class Boom(DistillTerm):
    """Test-only term: 0, with a zero gradient, until its ``at_call``-th training call; +inf from then on."""

    name = "boom"

    def __init__(self, at_call: int, weight: float = 1.0):
        super().__init__(weight)
        self.at_call, self.calls = at_call, 0

    def forward(self, student, teacher, target, index):
        self.calls += 1
        return (student.logits * 0).sum() + (math.inf if self.calls >= self.at_call else 0.0)


class RecordFiniteness(pl.Callback):
    """Test-only: whether each step's total loss and gradients were finite, read on the host, to ``path``."""

    def __init__(self, path: str):
        self.path, self.steps = Path(path), {}

    def on_after_backward(self, trainer, pl_module):
        """Whether the gradients' float32 2-norm is finite, re-derived in float64: no non-finite entry, and a
        sum of squares within float32's range (a norm under about 1.8e19)."""
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        squares = sum(float(g.double().square().sum()) for g in grads)
        self.steps[trainer.global_step] = {"grads": squares <= torch.finfo(torch.float32).max}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[trainer.global_step - 1]["loss"] = math.isfinite(float(outputs["loss"]))
        self.path.write_text(json.dumps(self.steps))


def kd_args(name: str, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIGS / "digits/pair.yaml"),
        "--config",
        str(CONFIGS / "methods/kd.yaml"),
        "--model.init_args.teacher_weights=null",
        f"--trainer.limit_train_batches={BATCHES}",
        "--trainer.limit_val_batches=2",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.max_epochs=3",
        f"--trainer.logger.init_args.name={name}",
        *extra,
    ]


def saved_checkpoints(run: Path) -> dict[str, dict]:
    return {p.name: torch.load(p, weights_only=True) for p in sorted((run / "checkpoints").glob("*.ckpt"))}


def finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


@pytest.fixture(scope="module", params=[1, 50], ids=["log_every_step", "log_every_50_steps"])
def boom_run(request, tmp_path_factory):
    """A fit whose ``boom`` term is infinite from global step 5: found at that step's logging (every
    step) or before epoch 1's validation (every 50 steps). Returns the run directory and the error."""
    root = tmp_path_factory.mktemp("boom")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with pytest.raises(NonFiniteError) as error:
            build_cli(
                kd_args(
                    "boom",
                    '--model.init_args.terms+={"class_path": "test_nonfinite.Boom", "init_args": {"at_call": 6}}',
                    f"--trainer.log_every_n_steps={request.param}",
                )
            )
    finally:
        os.chdir(cwd)
    return root / "runs/boom/version_0", str(error.value)


def test_the_error_names_the_first_bad_step_its_terms_and_the_last_checkpoint(boom_run):
    run, message = boom_run
    assert "\n" not in message
    # the weighted term and the total: CE, KD and the gradient norm (Boom's gradient is 0) stayed finite
    assert f"train/loss_boom, train/loss not finite at global step {BAD_STEP};" in message
    assert "the last checkpoint written before it is runs/boom/version_0/checkpoints/last.ckpt." in message


def test_nothing_after_the_bad_step_is_validated_saved_or_selected_as_best(boom_run):
    run, _ = boom_run
    saved = saved_checkpoints(run)
    assert set(saved) == {"last.ckpt", "best-epoch000.ckpt"}  # written at the end of epoch 0 only
    assert all(ckpt["global_step"] == BATCHES and finite(ckpt["state_dict"]) for ckpt in saved.values())
    rows = read_metrics(run)
    assert [epoch for epoch, _ in series(rows, "val/top1")] == [0]
    assert [epoch for epoch, _ in series(rows, "val/top1_best")] == [0]


def test_export_refuses_a_checkpoint_with_a_nan_weight(boom_run, tmp_path, capsys):
    run, _ = boom_run
    good = run / "checkpoints/last.ckpt"
    load_network(good)  # finite: loads
    ckpt = torch.load(good, weights_only=True)
    ckpt["state_dict"]["student.fc.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(NonFiniteError, match=r"nan\.ckpt: .*\(fc\.weight\)"):
        load_network(bad)
    with pytest.raises(SystemExit) as exit_:
        export([str(bad), "--out", str(tmp_path / "out"), "--formats", "pt"])
    assert exit_.value.code != 0
    assert str(exit_.value).count("\n") == 0 and "fc.weight" in str(exit_.value)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_with_non_finite_weights_is_never_written(in_tmp):
    cli = build_cli(kd_args("nan", *FAST, "--trainer.max_epochs=1")[1:], run=False)  # no subcommand
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    with torch.no_grad():
        cli.model.student.conv1.weight[0, 0, 0, 0] = float("inf")
    path = in_tmp / "refused.ckpt"
    with pytest.raises(NonFiniteError, match=r"student\.conv1\.weight"):
        cli.trainer.save_checkpoint(path)
    assert not path.exists()


def test_a_diverging_lr_exits_non_zero_at_the_first_non_finite_step(in_tmp):
    """LR × 1e13 from epoch 1 on: the process fails naming the first step whose loss or gradients were
    not finite (recorded independently, on the host), and leaves only epoch 0's finite checkpoints."""
    record = in_tmp / "steps.json"
    args = kd_args(
        "lr",
        "--model.init_args.lr_schedule.init_args.milestones=[1]",
        "--model.init_args.lr_schedule.init_args.gamma=1e13",
        "--trainer.callbacks+=test_nonfinite.RecordFiniteness",
        f"--trainer.callbacks.path={record}",
        "--trainer.log_every_n_steps=50",
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "distill.cli", *args], cwd=in_tmp, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    steps = {int(k): v for k, v in json.loads(record.read_text()).items()}
    first_bad = min(step for step, ok in steps.items() if not (ok["grads"] and ok.get("loss", True)))
    assert first_bad >= BATCHES  # epoch 0 trained normally
    line = next(line for line in result.stderr.splitlines() if "training diverged" in line)
    names, step = re.search(r"training diverged: (.+) not finite at global step (\d+);", line).groups()
    assert int(step) == first_bad
    assert ("train/loss" in names.split(", ")) == (not steps[first_bad]["loss"])
    assert ("gradient norm" in names.split(", ")) == (not steps[first_bad]["grads"])
    assert "the last checkpoint written before it is runs/lr/version_0/checkpoints/last.ckpt." in line
    run = in_tmp / "runs/lr/version_0"
    saved = saved_checkpoints(run)
    assert set(saved) == {"last.ckpt", "best-epoch000.ckpt"}
    assert all(finite(ckpt["state_dict"]) for ckpt in saved.values())
