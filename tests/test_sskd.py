"""SSKD: each phase changes only what it trains (parameters, BN buffers, momentum), the phases follow
the epochs given, resume mid-phase is exact, DDP ranks agree, the CLI runs, bad configs fail early."""

import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from fakedata import write_fake_cifar100
from helpers import CONFIGS, FAST
from pytorch_lightning.strategies import DDPStrategy
from rank_dump import run_two_ranks

from distill.callbacks import StagePlan
from distill.cli import build_cli, main
from distill.data import DigitsDataModule
from distill.errors import ConfigError
from distill.methods.base import require_unused_parameter_search
from distill.methods.sskd import SSKD, mimic_loss
from distill.models import create_model
from distill.schedules import Constant
from distill.stages import StagedSchedule, stage_epochs
from distill.tools.results import load_run
from distill.tools.runs import read_metrics

DIGITS = dict(num_classes=10, in_chans=1, image_size=16)
LR = 0.05

# wrn_16_2 → wrn_16_1: channels differ at every stage (adapters 0-2), and the head has a final BN.
STAGE1, STAGE2, STAGE3 = ("student.conv1.", "student.block1."), ("student.block2.",), ("student.block3.",)
ADAPTER = [("adapters.0.",), ("adapters.1.",), ("adapters.2.",)]
HEAD = ("student.bn1.", "student.fc.")
BACKBONE = STAGE1 + STAGE2 + STAGE3 + ADAPTER[0] + ADAPTER[1] + ADAPTER[2]


class EpochRecorder(pl.Callback):
    """Records the phase and LRs of every epoch and the state (parameters, buffers, momentum) at its
    end; with ``out_dir`` every rank saves its records at the end of training."""

    def __init__(self, out_dir: str | None = None):
        self.out_dir = out_dir
        self.phases, self.lrs, self.states, self.momenta = [], [], [], []

    def snapshot(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        names = {id(p): n for n, p in pl_module.named_parameters()}
        state = trainer.optimizers[0].state
        self.momenta.append(
            {names[id(p)]: s["momentum_buffer"].clone() for p, s in state.items() if "momentum_buffer" in s}
        )

    def on_train_start(self, trainer, pl_module):
        self.snapshot(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        self.phases.append(pl_module.phase_index)
        self.lrs.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs[-1].append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, pl_module):
        self.snapshot(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.out_dir:
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            torch.save(
                {"phases": self.phases, "states": self.states}, Path(self.out_dir) / f"rank{trainer.global_rank}.pt"
            )


class ZeroFilledGrads(pl.Callback):
    """Gives every parameter without a gradient a zero one, as DDP with find_unused_parameters may."""

    def on_after_backward(self, trainer, pl_module):
        for p in pl_module.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)


def fit_digits(epochs, *callbacks, student="wrn_16_1", teacher="wrn_16_2", **module_kwargs):
    torch.manual_seed(0)
    module = SSKD(student=student, teacher=teacher, lr=LR, **DIGITS, **module_kwargs)
    trainer = pl.Trainer(
        max_epochs=sum(epochs) if epochs else 4,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        callbacks=list(callbacks),
    )
    trainer.fit(module, DigitsDataModule(batch_size=16))
    return module


def assert_only_changed(before: dict, after: dict, prefixes: tuple[str, ...], what: str):
    for key in before:
        assert (not torch.equal(before[key], after[key])) == key.startswith(prefixes), f"{what}: {key}"


# plan options → (epochs of the phases, what each phase trains)
CASES = {
    "paper": ({}, [2, 1, 1, 1], [STAGE1 + ADAPTER[0], STAGE2 + ADAPTER[1], STAGE3 + ADAPTER[2], HEAD]),
    "classifier_only": (
        {"head_trains": "classifier"},
        [1, 1, 1, 1],
        [STAGE1 + ADAPTER[0], STAGE2 + ADAPTER[1], STAGE3 + ADAPTER[2], ("student.fc.",)],
    ),
    "last_stage_and_head": (
        {"head_trains": "last_stage_and_head"},
        [1, 1, 1, 1],
        [STAGE1 + ADAPTER[0], STAGE2 + ADAPTER[1], STAGE3 + ADAPTER[2], STAGE3 + HEAD],
    ),
    "unfrozen": (
        {"freeze_earlier_stages": False},
        [1, 1, 1, 1],
        [STAGE1 + ADAPTER[0], STAGE1 + STAGE2 + ADAPTER[1], STAGE1 + STAGE2 + STAGE3 + ADAPTER[2], HEAD],
    ),
    "joint_mimic": ({"plan": "joint_mimic"}, [1, 1], [BACKBONE, HEAD]),
    "joint_ce": ({"plan": "joint_ce"}, [1], [BACKBONE + HEAD]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_each_phase_changes_only_what_it_trains(case):
    kwargs, epochs, trained = CASES[case]
    rec = EpochRecorder()
    fit_digits(epochs, StagePlan(epochs=epochs), ZeroFilledGrads(), rec, **kwargs)
    assert rec.phases == [k for k, n in enumerate(epochs) for _ in range(n)]
    start = 0
    for k, n in enumerate(epochs):
        lrs = [lr for epoch in rec.lrs[start : start + n] for lr in epoch]
        assert lrs[0] == pytest.approx(LR) and all(a > b for a, b in zip(lrs, lrs[1:])), f"phase {k + 1}: {lrs}"
        before, after = rec.states[start], rec.states[start + n]
        assert_only_changed(before, after, trained[k], f"phase {k + 1}")  # parameters and BN buffers
        m_before, m_after = rec.momenta[start], rec.momenta[start + n]
        for name, buffer in m_after.items():
            if name.startswith(trained[k]):
                assert name not in m_before or not torch.equal(m_before[name], buffer), f"phase {k + 1}: {name}"
            else:  # momentum of frozen parameters is neither created nor moved
                assert name in m_before and torch.equal(m_before[name], buffer), f"phase {k + 1}: {name}"
        start += n


def test_step_schedule_drops_within_each_phase_and_restarts():
    s = StagedSchedule([0, 8, 12], ["step", "step"], Constant(), step_milestones=(0.5, 0.75), step_gamma=0.1)
    assert [s(e) for e in (0, 3.9, 4, 6, 7.9)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    assert [s(e) for e in (8, 9.9, 10, 11, 12.5)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])


def test_mimic_loss_pools_the_larger_map_and_adapters_only_where_channels_differ():
    s, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 8, 8)
    pooled = t.double().reshape(2, 4, 4, 2, 4, 2).mean((3, 5))  # 2x2 average pooling, by hand
    squared = (s.double() - pooled) ** 2
    # default: squared distance of the 4-channel feature vectors, averaged over 2·4·4 positions
    torch.testing.assert_close(mimic_loss(s, t).double(), squared.sum() / 32)
    torch.testing.assert_close(mimic_loss(s, t, "mean").double(), squared.mean())
    same = SSKD(student="resnet8", teacher="resnet20", **DIGITS)
    assert all(isinstance(a, torch.nn.Identity) for a in same.adapters)
    cross = SSKD(student="ShuffleV1", teacher="resnet32x4", num_classes=100, in_chans=3, image_size=32)
    assert all(isinstance(a, torch.nn.Sequential) for a in cross.adapters)
    images = torch.randn(2, 3, 32, 32)
    stages, _ = cross.run_student(images, cross.phases[2])
    losses = cross.mimic_losses(images, stages, cross.phases[0]) | cross.mimic_losses(images, stages, cross.phases[2])
    assert set(losses) == {"mimic_stage1", "mimic_stage3"} and all(torch.isfinite(v) for v in losses.values())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pair", "adapters", "epochs"),
    [
        # the head phase 10% of the epochs, the stage phases an equal split of the rest
        ("cifar100/pairs/resnet56_resnet20.yaml", 0, [72, 72, 72, 24]),
        ("cifar100/pairs/resnet32x4_resnet8x4.yaml", 0, [72, 72, 72, 24]),
        ("cifar100/pairs/vgg13_vgg8.yaml", 0, [44, 43, 43, 43, 43, 24]),
        ("cifar100/pairs/wrn_40_2_wrn_40_1.yaml", 3, [72, 72, 72, 24]),
        ("imagenet/pairs/resnet34_resnet18.yaml", 0, [23, 23, 22, 22, 10]),
    ],
)
def test_pair_configs_compose_with_sskd(in_tmp, pair, adapters, epochs):
    cli = build_cli(
        [
            "--config",
            str(CONFIGS / pair),
            "--config",
            str(CONFIGS / "sskd/sskd.yaml"),
            "--model.init_args.teacher_weights=null",
        ],
        run=False,
    )
    module = cli.model
    assert isinstance(module, SSKD)
    assert sum(not isinstance(a, torch.nn.Identity) for a in module.adapters) == adapters
    (plan,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, StagePlan)]
    assert stage_epochs(module.stages(), cli.trainer.max_epochs, plan.epochs) == epochs


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ablation", "phases", "head_first", "schedule"),
    [
        ("joint_mimic", ["all stages", "head"], 3, "cyclic"),
        ("joint_ce", ["joint CE + mimic"], 0, "cyclic"),
        ("unfrozen", ["stage 1", "stage 2", "stage 3", "head"], 3, "cyclic"),
        ("head_and_last_stage", ["stage 1", "stage 2", "stage 3", "head"], 2, "cyclic"),
        ("classifier_only", ["stage 1", "stage 2", "stage 3", "head"], 4, "cyclic"),
        ("step_lr", ["stage 1", "stage 2", "stage 3", "head"], 3, "step"),
        ("random_head", ["stage 1", "stage 2", "stage 3", "head"], 3, "cyclic"),
    ],
)
def test_ablation_configs_compose_after_sskd(in_tmp, ablation, phases, head_first, schedule):
    cli = build_cli(
        [
            "--config",
            str(CONFIGS / "cifar100/pairs/resnet56_resnet20.yaml"),
            "--config",
            str(CONFIGS / "sskd/sskd.yaml"),
            "--config",
            str(CONFIGS / f"sskd/ablations/{ablation}.yaml"),
            "--model.init_args.teacher_weights=null",
        ],
        run=False,
    )
    module, (plan,) = cli.model, [cb for cb in cli.trainer.callbacks if isinstance(cb, StagePlan)]
    assert [p.name for p in module.phases] == phases and module.phases[-1].first == head_first
    assert module.own_head_reason == ("head_init=random" if ablation == "random_head" else None)
    plan.setup(pl.Trainer(max_epochs=240, logger=False), module, "fit")
    assert module.stage_schedule.policies == [schedule] * len(phases)
    stage2 = [p for p in module.phases if p.name == "stage 2"]
    assert not stage2 or stage2[0].first == (0 if ablation == "unfrozen" else 1)


@pytest.fixture
def digits_teacher(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    torch.save(create_model("resnet20", **{k: DIGITS[k] for k in ("num_classes", "in_chans")}).state_dict(), path)
    return path


def digits_cli_args(teacher, epochs, *extra):
    return [
        "fit",
        "--config",
        str(CONFIGS / "digits/pair.yaml"),
        "--config",
        str(CONFIGS / "digits/sskd.yaml"),
        f"--model.init_args.teacher_weights={teacher}",
        f"--trainer.max_epochs={epochs}",
        *FAST,
        *extra,
    ]


@pytest.mark.slow
def test_resume_in_the_middle_of_phase_2_equals_uninterrupted(tmp_path, digits_teacher, monkeypatch):
    monkeypatch.chdir(tmp_path)  # 6 epochs split [2, 2, 1, 1]: stopping after 3 epochs is mid-phase 2
    main(digits_cli_args(digits_teacher, 6, "--trainer.logger.init_args.name=straight"))
    main(digits_cli_args(digits_teacher, 6, "--trainer.logger.init_args.name=split", "--trainer.max_steps=6"))
    first = tmp_path / "runs/split/version_0/checkpoints/last.ckpt"
    assert torch.load(first, weights_only=True)["epoch"] == 2
    main(digits_cli_args(digits_teacher, 6, f"--ckpt_path={first}"))
    straight = torch.load(tmp_path / "runs/straight/version_0/checkpoints/last.ckpt", weights_only=True)
    resumed = torch.load(first, weights_only=True)
    assert resumed["global_step"] == straight["global_step"] == 12
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for key in straight["state_dict"]:
        assert torch.equal(straight["state_dict"][key], resumed["state_dict"][key]), key
    for a, b in zip(
        straight["optimizer_states"][0]["state"].values(), resumed["optimizer_states"][0]["state"].values()
    ):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


@pytest.mark.ddp
def test_two_process_ddp_keeps_ranks_identical_and_frozen_parts_fixed(tmp_path, digits_teacher):
    rank0, rank1 = run_two_ranks(
        digits_cli_args(digits_teacher, 4),
        tmp_path,
        callback="test_sskd.EpochRecorder",
        strategy="ddp_find_unused_parameters_true",
    )
    assert rank0["phases"] == rank1["phases"] == [0, 1, 2, 3]
    for s0, s1 in zip(rank0["states"], rank1["states"], strict=True):
        for key in s0:
            assert torch.equal(s0[key], s1[key]), key
    # resnet8: stage 1 = stem + layer1; no adapters (same channels as resnet20)
    trained = [
        ("student.conv1.", "student.bn1.", "student.layer1."),
        ("student.layer2.",),
        ("student.layer3.",),
        ("student.fc.",),
    ]
    states = rank0["states"]
    for k, prefixes in enumerate(trained):
        assert_only_changed(states[k], states[k + 1], prefixes, f"phase {k + 1}")


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=2, per_class_test=1)


@pytest.mark.slow
def test_sskd_runs_through_cli_on_fake_cifar_and_says_when_top1_is_meaningless(in_tmp, fake_cifar):
    torch.manual_seed(0)
    teacher = in_tmp / "resnet56.pt"
    torch.save(create_model("resnet56").state_dict(), teacher)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("pytorch_lightning")
    level = logger.level  # another test in this process may have quietened it (the demo's quiet())
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "cifar100/pairs/resnet56_resnet20.yaml"),
                "--config",
                str(CONFIGS / "sskd/sskd.yaml"),
                f"--model.init_args.teacher_weights={teacher}",
                f"--data.init_args.data_dir={fake_cifar}",
                "--data.init_args.verify_md5=false",
                "--data.init_args.batch_size=16",
                "--data.init_args.num_workers=0",
                "--trainer.max_epochs=4",
                *FAST,
            ]
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    run = in_tmp / "runs/cifar100/sskd/resnet56-resnet20/version_0"
    rows = read_metrics(run)
    logged = {k for r in rows for k in r}
    expected = {f"train/loss_mimic_stage{k}_step" for k in (1, 2, 3)} | {"train/loss_ce_step", "stage", "val/top1"}
    expected |= {f"val/top1_end_of_phase{k}_untrained_head" for k in (1, 2, 3)} | {"val/top1_end_of_phase4"}
    assert expected <= logged
    assert sorted({int(r["stage"]) for r in rows if "stage" in r}) == [0, 1, 2, 3]
    starts = [m for m in messages if m.startswith("SSKD phase")]
    assert len(starts) == 4 and all("not meaningful" in m for m in starts[:3]) and "not meaningful" not in starts[3]
    state = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith(("teacher", "adapters")) for k in state)  # same family: no adapter


# ---- start-up errors -------------------------------------------------------------------------
def startup(epochs=None, max_epochs=4, module=None):
    module = module or SSKD(student="resnet8", teacher="resnet20", **DIGITS)
    StagePlan(epochs=epochs).setup(pl.Trainer(max_epochs=max_epochs, logger=False), module, "fit")


@pytest.mark.parametrize(
    ("epochs", "max_epochs", "message"),
    [
        ([1, 1, 1, 2], 4, r"stages.epochs=\[1, 1, 1, 2\] sum to 5, but trainer.max_epochs=4"),
        ([2, 2], 4, r"\[2, 2\]: expected 4 positive epoch counts, one per stage \(stage 1, stage 2, stage 3, head\)"),
        (None, 3, r"trainer.max_epochs=3 cannot be split among the 4 stages"),
    ],
)
def test_bad_phase_epochs_fail_at_setup(epochs, max_epochs, message):
    with pytest.raises(ValueError, match=message):
        startup(epochs, max_epochs)


@pytest.mark.slow
def test_bad_phase_epochs_fail_through_cli(in_tmp, digits_teacher):
    with pytest.raises(ValueError, match=r"expected 4 positive epoch counts, one per stage"):
        build_cli(digits_cli_args(digits_teacher, 4, "--stages.epochs=[1,1,2]"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": [2, 0, 1, 1]}, r"epochs=\[2, 0, 1, 1\]: expected a list of integers > 0"),
        ({"min_lr_factor": 1.5}, r"min_lr_factor=1.5"),
        ({"step_milestones": [0.8, 0.5]}, r"step_milestones=\[0.8, 0.5\]: expected a non-empty increasing list"),
    ],
)
def test_bad_plan_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StagePlan(**kwargs)


def test_model_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"student vgg8 has 5 stages and teacher resnet20 has 3"):
        SSKD(student="vgg8", teacher="resnet20", **DIGITS)
    with pytest.raises(ValueError, match=r"head_trains='fc': expected one of 'classifier', 'head', 'last_stage_and_"):
        SSKD(student="resnet8", teacher="resnet20", head_trains="fc", **DIGITS)
    with pytest.raises(ValueError, match="SSKD needs the distill.callbacks.StagePlan callback"):
        fit_digits(None, student="resnet8", teacher="resnet20")


def test_plain_ddp_is_refused_and_resume_with_other_epochs_too():
    with pytest.raises(ValueError, match="SSKD leaves parameters unused.*ddp_find_unused_parameters_true"):
        require_unused_parameter_search(DDPStrategy(), "SSKD")
    require_unused_parameter_search(DDPStrategy(find_unused_parameters=True), "SSKD")
    plan = StagePlan()
    plan.setup(pl.Trainer(max_epochs=4, logger=False), SSKD(student="resnet8", teacher="resnet20", **DIGITS), "fit")
    saved = {**plan.state_dict(), "epochs": [2, 1, 1, 0]}
    with pytest.raises(ValueError, match=r"'epochs': \[1, 1, 1, 1\]\} differs from the checkpoint's .*\[2, 1, 1, 0\]"):
        plan.load_state_dict(saved)


@pytest.mark.slow
def test_only_the_head_phase_can_be_the_best(tmp_path, digits_teacher, monkeypatch):
    """Backbone phases evaluate an untrained classifier: they log no val/top1_best and write no best checkpoint."""
    monkeypatch.chdir(tmp_path)  # 6 epochs split [2, 2, 1, 1]: the head phase is epoch 5
    main(digits_cli_args(digits_teacher, 6, "--trainer.logger.init_args.name=run"))
    run = tmp_path / "runs/run/version_0"
    rows = read_metrics(run)
    best_epochs = sorted({int(r["epoch"]) for r in rows if "val/top1_best" in r})
    top1 = {int(r["epoch"]): r["val/top1"] for r in rows if "val/top1" in r}
    assert best_epochs == [5] and len(top1) == 6  # val/top1 itself is still logged every epoch
    assert [p.name for p in (run / "checkpoints").glob("best-*.ckpt")] == ["best-epoch005.ckpt"]
    assert "val/teacher_top1_best" in {k for r in rows for k in r}  # the teacher's measurement still counts
    assert load_run(run).best == pytest.approx(100 * top1[5])  # the results table's [best] too


def test_default_phase_epochs_give_the_head_a_tenth_and_the_stages_the_rest():
    def split(plan: str, max_epochs: int) -> list[int]:
        return stage_epochs(SSKD(student="resnet8", teacher="resnet20", plan=plan, **DIGITS).stages(), max_epochs)

    assert split("stage_by_stage", 60) == [18, 18, 18, 6]
    assert split("stage_by_stage", 4) == [1, 1, 1, 1]  # the head gets at least one epoch
    assert split("stage_by_stage", 5) == [2, 1, 1, 1]
    assert split("joint_mimic", 30) == [27, 3]  # all stages, then the head
    assert split("joint_ce", 7) == [7]  # one phase
    assert stage_epochs(SSKD(student="resnet8", teacher="resnet20", **DIGITS).stages(), 8, [2, 2, 2, 2]) == [2] * 4


# ---- where the head phase starts ------------------------------------------------------------------
def randomise_adapter(adapter: torch.nn.Module) -> None:
    """Non-trivial weights and BatchNorm statistics, as phase K leaves them."""
    conv, bn = adapter
    with torch.no_grad():
        conv.weight.normal_()
        bn.weight.uniform_(0.5, 2.0), bn.bias.normal_()
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0)


def test_head_phase_starts_from_the_teacher_classifier_folded_through_the_adapter():
    """resnet8 (64 channels) → resnet8x4 (256): the started student's logits equal the teacher's classifier
    reading the pooled adapter output (computed here without the fold)."""
    torch.manual_seed(0)
    module = SSKD(student="resnet8", teacher="resnet8x4", **DIGITS)
    adapter = module.adapters[-1]
    randomise_adapter(adapter)
    assert module.own_head_reason is None
    assert module.start_head_phase() == "from the teacher's classifier folded through the last stage's adapter"
    module.eval()
    images = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        last = module.student.forward_stages(images)[-1]
        expected = module.teacher.head.classifier(adapter(last).mean((2, 3)))
        assert torch.allclose(module.student(images), expected, atol=1e-4, rtol=1e-4)


def test_head_phase_copies_the_teacher_head_where_no_adapter_is_needed():
    torch.manual_seed(0)
    resnets = SSKD(student="resnet8", teacher="resnet20", **DIGITS)  # same widths, no final norm
    assert resnets.start_head_phase() == "from the teacher's classifier"
    for key, value in resnets.teacher.fc.state_dict().items():
        assert torch.equal(resnets.student.fc.state_dict()[key], value), key
    wrns = SSKD(student="wrn_16_2", teacher="wrn_40_2", **DIGITS)  # same widths, a final BN
    with torch.no_grad():
        wrns.teacher.bn1.running_mean.normal_(), wrns.teacher.bn1.weight.normal_()
    assert wrns.start_head_phase() == "from the teacher's final norm and classifier"
    for name in ("bn1", "fc"):
        t, s = getattr(wrns.teacher, name).state_dict(), getattr(wrns.student, name).state_dict()
        assert all(torch.equal(s[k], t[k]) for k in t), name


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(student="wrn_16_1", teacher="wrn_16_2"), "an adapter stands between the last stages"),
        (dict(student="wrn_16_2", teacher="wrn_40_2", head_trains="classifier"), "leaves the student's final norm"),
    ],
)
def test_where_the_teacher_head_cannot_start_the_student_auto_says_why_and_teacher_is_refused(kwargs, reason):
    torch.manual_seed(0)
    module = SSKD(**kwargs, **DIGITS)
    before = {k: v.clone() for k, v in module.student.head.state_dict().items()}
    assert reason in module.own_head_reason
    assert module.start_head_phase().startswith("from the student's own classifier (")
    assert all(torch.equal(before[k], v) for k, v in module.student.head.state_dict().items())
    refused = f"head_init=teacher: the teacher's head cannot start the student's .*{reason}"
    with pytest.raises(ConfigError, match=refused):
        SSKD(**kwargs, head_init="teacher", **DIGITS)
    literal = SSKD(student="resnet8", teacher="resnet20", head_init="random", **DIGITS)
    assert literal.own_head_reason == "head_init=random"


class HeadAtEpochStart(pl.Callback):
    """The student's classifier weight at every epoch start, after the StagePlan has entered the epoch's phase."""

    def __init__(self):
        self.weights = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.weights.append(pl_module.student.fc.weight.detach().clone())


@pytest.mark.slow
def test_the_fit_starts_the_head_phase_from_the_teacher_once_at_its_first_epoch(caplog):
    heads = HeadAtEpochStart()
    caplog.set_level(logging.INFO, logger="pytorch_lightning")
    module = fit_digits([1, 1, 1, 2], StagePlan(epochs=[1, 1, 1, 2]), heads, student="resnet8", teacher="resnet20")
    teacher_fc = module.teacher.fc.weight
    assert [torch.equal(w, teacher_fc) for w in heads.weights] == [False, False, False, True, False]
    assert not torch.equal(heads.weights[3], heads.weights[4])  # then it learns
    assert "SSKD phase 4/4 (head)" in caplog.text and "it starts from the teacher's classifier" in caplog.text
