"""PWKD: slimmable conversion, joint teacher training, stages with cyclic LR, resume, DDP."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import yaml
from fakedata import write_fake_cifar100
from helpers import CONFIGS, FAST
from rank_dump import assert_same_tensors, run_two_ranks
from torch import nn

from distill.callbacks import StagePlan
from distill.cli import build_cli, main
from distill.losses import CRDTerm, FitNetTerm, KDTerm
from distill.methods.base import refuse_lossy_sync_batchnorm
from distill.methods.connectors import PerStageConnector, SlicedConnector
from distill.methods.pwkd import PWKD
from distill.methods.slimmable_supervised import SlimmableSupervised
from distill.models import create_model
from distill.models.cifar.mobilenetv2 import MobileNetV2, conv_bn_relu
from distill.models.cifar.resnet import THIN, CifarResNet
from distill.models.cifar.shufflenetv1 import Bottleneck as ShuffleV1Block
from distill.models.cifar.shufflenetv1 import ShuffleNetV1
from distill.models.cifar.shufflenetv2 import DownBlock, ShuffleNetV2
from distill.models.cifar.vgg import CONFIGS as VGG_CONFIGS
from distill.models.cifar.vgg import VGG
from distill.models.cifar.wrn import NetworkBlock, WideResNet
from distill.models.slimmable import (
    channels_at,
    checkpoint_widths,
    get_width,
    load_slimmable,
    make_slimmable,
    set_width,
    width_name,
)
from distill.models.weights import file_sha256
from distill.schedules import MultiStep
from distill.stages import stage_epochs
from distill.tools.runs import read_metrics

W = 0.5  # the width the narrow-equivalence tests compare at


def c(n: int, quantum: int = 1) -> int:
    return channels_at(n, W, quantum)


# ---- narrow networks built from the zoo's own classes ------------------------------------------
def narrow_resnet8():
    return CifarResNet(8, tuple(c(n) for n in THIN), num_classes=10)


def narrow_vgg8():
    return VGG([[c(n) for n in block] for block in VGG_CONFIGS["vgg8"]], num_classes=10)


def narrow_wrn_16_1():
    net = WideResNet(16, 1, num_classes=10)
    net.conv1 = nn.Conv2d(3, c(16), 3, 1, 1, bias=False)
    net.block1, net.block2, net.block3 = (
        NetworkBlock(2, c(a), c(b), s) for a, b, s in ((16, 16, 1), (16, 32, 2), (32, 64, 2))
    )
    net.bn1, net.fc = nn.BatchNorm2d(c(64)), nn.Linear(c(64), 10)
    return net


def narrow_mobilenetv2():
    net = MobileNetV2(width_mult=0.5 * W, num_classes=10)  # the zoo model is half width already
    net.conv2 = conv_bn_relu(c(160), c(1280), 1, 1)  # the zoo keeps 1280 below width 1
    net.classifier = nn.Sequential(nn.Linear(c(1280), 10))
    return net


def narrow_shufflev2():
    net = ShuffleNetV2(out_channels=(c(116), c(232), c(464), c(1024)), num_classes=10)
    net.conv1, net.bn1 = nn.Conv2d(3, c(24), 1, bias=False), nn.BatchNorm2d(c(24))  # the zoo fixes the stem at 24
    net.layer1[0] = DownBlock(c(24), c(116))
    return net


def narrow_shufflev1():
    net = ShuffleNetV1(out_planes=(c(240), c(480), c(960)), num_classes=10)
    net.conv1, net.bn1 = nn.Conv2d(3, c(24), 1, bias=False), nn.BatchNorm2d(c(24))
    first = net.layer1[0] = ShuffleV1Block(c(24), c(240) - c(24), 2, 3)
    first.groups1, first.conv1 = (
        1,
        nn.Conv2d(c(24), first.conv1.out_channels, 1, bias=False),
    )  # ungrouped after the stem
    return net


NARROW = {
    "resnet8": narrow_resnet8,
    "vgg8": narrow_vgg8,
    "wrn_16_1": narrow_wrn_16_1,
    "MobileNetV2": narrow_mobilenetv2,
    "ShuffleV2": narrow_shufflev2,
    "ShuffleV1": narrow_shufflev1,
}


def randomise_batchnorms(model: nn.Module) -> None:
    """Distinct affine parameters and running statistics for every width's BatchNorm."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def copy_width_into(slim: nn.Module, narrow: nn.Module, width: float) -> None:
    """The narrow model gets the leading slices of the shared weights and the width's own BatchNorms."""
    state = slim.state_dict()
    own = {}
    for key, value in narrow.state_dict().items():
        module, leaf = key.rsplit(".", 1)
        source = state.get(f"{module}.per_width.{width_name(width)}.{leaf}", state[key])
        own[key] = source[tuple(slice(0, n) for n in value.shape)]
    narrow.load_state_dict(own)


@pytest.mark.parametrize("arch", sorted(NARROW))
def test_sub_network_equals_an_ordinary_narrow_network(arch):
    torch.manual_seed(0)
    slim = make_slimmable(create_model(arch, num_classes=10))
    randomise_batchnorms(slim)
    narrow = NARROW[arch]()
    copy_width_into(slim, narrow, W)
    slim.eval(), narrow.eval()
    x = torch.randn(2, 3, 32, 32)
    set_width(slim, W)
    with torch.no_grad():
        got, want = slim(x, features=True), narrow(x, features=True)
    assert [s.shape for s in got.stages] == [s.shape for s in want.stages]  # really fewer channels
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    set_width(slim, 1.0)
    with torch.no_grad():
        assert slim(x, features=True).stages[-1].shape[1] > got.stages[-1].shape[1]


@pytest.mark.parametrize("arch, channels", [("resnet18", [64, 128, 256, 512]), ("mobilenet_v2", [24, 32, 96, 320])])
def test_imagenet_models_run_at_every_width(arch, channels):
    slim = make_slimmable(create_model(arch, num_classes=10)).eval()
    for width in slim.slimmable_widths:
        set_width(slim, width)
        with torch.no_grad():
            out = slim(torch.zeros(1, 3, 32, 32), features=True)
        assert [s.shape[1] for s in out.stages] == [channels_at(n, width) for n in channels]
        assert out.logits.shape == (1, 10)


def test_a_width_trains_only_its_own_batchnorm():
    slim = make_slimmable(create_model("resnet8", num_classes=10))
    before = {k: v.clone() for k, v in slim.state_dict().items()}
    set_width(slim, 0.5)
    slim.train()
    slim(torch.randn(4, 3, 32, 32))
    changed = {k.rsplit(".", 1)[0] for k, v in slim.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".per_width.w0_5" in k for k in changed), changed


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the convolutions and linears, from the shapes they really ran with."""
    total = 0

    def add(module, inputs, output):
        nonlocal total
        c_in = inputs[0].shape[1]
        if isinstance(module, nn.Conv2d):
            groups = c_in if module.groups == module.in_channels else module.groups
            total += output.numel() // output.shape[0] * (c_in // groups) * math.prod(module.kernel_size)
        else:
            total += output.shape[1] * c_in

    hooks = [m.register_forward_hook(add) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return total


@pytest.mark.parametrize("arch", ["resnet8", "MobileNetV2"])
def test_cost_falls_with_width(arch):
    slim = make_slimmable(create_model(arch, num_classes=10)).eval()
    macs = []
    for width in slim.slimmable_widths:
        set_width(slim, width)
        macs.append(count_macs(slim, torch.zeros(1, 3, 32, 32)))
    assert macs == sorted(set(macs))
    assert macs[0] < 0.15 * macs[-1]  # roughly quadratic in the width (0.25² = 0.0625)


def test_whole_width_is_the_ordinary_network(tmp_path):
    ordinary = create_model("resnet8", num_classes=10)
    randomise_batchnorms(ordinary)
    torch.save(ordinary.state_dict(), tmp_path / "plain.pt")
    slim = load_slimmable(create_model("resnet8", num_classes=10), tmp_path / "plain.pt", widths=(0.5, 1.0))
    extra = set(slim.state_dict()) - set(ordinary.state_dict())
    assert extra and all(".per_width.w0_5." in k for k in extra)
    assert set(ordinary.state_dict()) <= set(slim.state_dict())
    x = torch.randn(2, 3, 32, 32)
    ordinary.eval(), slim.eval()
    torch.testing.assert_close(slim(x), ordinary(x), rtol=0, atol=0)
    # narrow BatchNorms start from the ordinary statistics' slices
    torch.testing.assert_close(slim.bn1.per_width["w0_5"].running_var, ordinary.bn1.running_var[:8])
    # a slimmable checkpoint reloads at the widths it holds
    torch.save(slim.state_dict(), tmp_path / "slim.pt")
    assert checkpoint_widths(slim.state_dict()) == (0.5, 1.0)
    again = load_slimmable(create_model("resnet8", num_classes=10), tmp_path / "slim.pt").eval()
    for width in (0.5, 1.0):
        set_width(slim, width), set_width(again, width)
        assert torch.equal(slim(x), again(x))
    with pytest.raises(ValueError, match="trained at widths"):
        load_slimmable(create_model("resnet8", num_classes=10), tmp_path / "slim.pt", widths=(0.25, 1.0))


def test_conversion_rejects_what_it_cannot_slim():
    with pytest.raises(ValueError, match="include 1.0"):
        make_slimmable(create_model("resnet8", num_classes=10), widths=(0.25, 0.5))
    odd = create_model("resnet8", num_classes=10)
    odd.bn1 = nn.GroupNorm(4, 16)
    with pytest.raises(ValueError, match="GroupNorm"):
        make_slimmable(odd)
    slim = make_slimmable(create_model("resnet8", num_classes=10), widths=(0.5, 1.0))
    with pytest.raises(ValueError, match="width 0.25 is not one of"):
        set_width(slim, 0.25)


# ---- the slimmable teacher ----------------------------------------------------------------------
def test_sandwich_rule_trains_narrow_widths_on_the_whole_output():
    torch.manual_seed(0)
    module = SlimmableSupervised(model="resnet8", sandwich=True, num_classes=10, in_chans=1, image_size=16)
    images, targets = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    losses, logits = module.training_losses(images, targets, torch.arange(8))
    assert set(losses) == {"ce", "kd_w0_25", "kd_w0_5", "kd_w0_75"}
    assert get_width(module.model) == 1.0 and logits.shape == (8, 10)
    sum(v for k, v in losses.items() if k != "ce").backward()
    narrow_bn = module.model.bn1.per_width["w0_25"].weight
    assert narrow_bn.grad is not None and narrow_bn.grad.abs().sum() > 0
    assert module.model.bn1.weight.grad is None  # the whole width's own BatchNorm: its soft targets are detached


def test_slimmable_teacher_starts_from_an_ordinary_one_and_refuses_sync_batchnorm(tmp_path):
    ordinary = create_model("resnet8", num_classes=10, in_chans=1)
    randomise_batchnorms(ordinary)
    torch.save({"state_dict": {f"model.{k}": v for k, v in ordinary.state_dict().items()}}, tmp_path / "plain.ckpt")
    module = SlimmableSupervised(
        model="resnet8", init_weights=str(tmp_path / "plain.ckpt"), num_classes=10, in_chans=1, image_size=16
    )
    x = torch.randn(2, 1, 16, 16)
    module.eval(), ordinary.eval()
    assert torch.equal(module(x), ordinary(x))
    with pytest.raises(ValueError, match=r"replace model.bn1 \(SlimmableBatchNorm2d, a BatchNorm with behaviour"):
        refuse_lossy_sync_batchnorm({"model": module.model})
    refuse_lossy_sync_batchnorm({"model": ordinary})  # plain BatchNorms convert without loss


@pytest.fixture(scope="module")
def slim_digits_teacher(tmp_path_factory):
    """A random slimmable resnet20 for the digits (widths 0.25 … 1.0), saved as a state_dict."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet20_slim.pt"
    torch.save(make_slimmable(create_model("resnet20", num_classes=10, in_chans=1), image_size=16).state_dict(), path)
    return path


def write_config(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def stages_config(tmp_path, widths, epochs, *callbacks, name="stages", **plan) -> str:
    """A config file with PWKD's stage widths, the stage plan's epochs (and ``plan`` fields) and extra callbacks."""
    config = {"model": {"init_args": {"stage_widths": widths}}, "stages": {"epochs": epochs, **plan}}
    if callbacks:
        config["trainer"] = {"callbacks": list(callbacks)}
    return write_config(tmp_path / f"{name}.yaml", config)


def pwkd_digits_args(teacher, *configs, epochs=4):
    return [
        "fit",
        "--config",
        str(CONFIGS / "digits/pair.yaml"),
        "--config",
        str(CONFIGS / "digits/pwkd.yaml"),
        *(a for cfg in configs for a in ("--config", cfg)),
        f"--model.init_args.teacher_weights={teacher}",
        f"--trainer.max_epochs={epochs}",
        *FAST,
    ]


@pytest.mark.slow
def test_slimmable_teacher_trains_through_cli_and_logs_every_width(in_tmp):
    main(["fit", "--config", str(CONFIGS / "digits/pwkd_teacher.yaml"), "--trainer.max_epochs=1", *FAST])
    run = in_tmp / "runs/digits/slimmablesupervised/resnet20/version_0"
    logged = {k for row in read_metrics(run) for k in row}
    assert {"val/top1", "val/w0_25_top1", "val/w0_5_top1", "val/w0_75_top1", "train/loss_ce_w0_25_step"} <= logged
    ckpt = run / "checkpoints/last.ckpt"
    assert checkpoint_widths(torch.load(ckpt, weights_only=True)["state_dict"]) == (0.25, 0.5, 0.75, 1.0)
    # a PWKD teacher loads from it at those widths
    module = PWKD(
        student="resnet8",
        teacher="resnet20",
        teacher_weights=str(ckpt),
        terms=[KDTerm()],
        num_classes=10,
        in_chans=1,
        image_size=16,
    )
    assert module.teacher_widths == (0.25, 0.5, 0.75, 1.0)
    assert not any(k.startswith("teacher") for k in module.state_dict())


# ---- stages, LR, resume -------------------------------------------------------------------------
class Recorder(pl.Callback):
    """Per training step: the optimiser's LR, the teacher's width and the channels its last stage ran with."""

    def __init__(self):
        self.steps = []

    def on_train_start(self, trainer, pl_module):
        pl_module.teacher.layer3.register_forward_hook(lambda m, i, out: setattr(self, "channels", out.shape[1]))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lr, self.width = trainer.optimizers[0].param_groups[0]["lr"], get_width(pl_module.teacher)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((self.lr, self.width, self.channels))


@pytest.mark.slow
def test_stages_set_teacher_width_and_restart_the_lr(in_tmp, slim_digits_teacher):
    recorder = {"class_path": "test_pwkd.Recorder"}
    cfg = stages_config(in_tmp, [0.25, 0.5, 1.0], [2, 2, 2], recorder)
    cli = build_cli(pwkd_digits_args(slim_digits_teacher, cfg, epochs=6))
    steps = next(cb for cb in cli.trainer.callbacks if isinstance(cb, Recorder)).steps
    assert len(steps) == 12  # 3 stages × 2 epochs × 2 batches
    base = 0.05
    expected = [base * 0.5 * (1 + math.cos(math.pi * (g % 4) / 4)) for g in range(12)]
    for g in (0, 4, 8):  # the first step of every stage starts a new cycle at the base LR
        assert steps[g][0] == pytest.approx(base)
    for g in (2, 6, 10):  # mid-stage: half way down the cosine
        assert steps[g][0] == pytest.approx(base / 2)
    assert steps[11][0] == pytest.approx(expected[11])  # last step
    assert [s[0] for s in steps] == pytest.approx(expected)
    assert [s[1] for s in steps] == [0.25] * 4 + [0.5] * 4 + [1.0] * 4
    assert [s[2] for s in steps] == [16] * 4 + [32] * 4 + [64] * 4  # the teacher really runs narrower
    rows = read_metrics(in_tmp / "runs/digits/pwkd/resnet20-resnet8/version_0")
    assert [r["pwkd/teacher_width"] for r in rows if "pwkd/teacher_width" in r] == [0.25] * 2 + [0.5] * 2 + [1.0] * 2
    assert {"val/stage0_top1", "val/stage2_top1", "val/teacher_top1", "lr_step"} <= {k for r in rows for k in r}


def test_monotone_schedule_is_one_cosine_and_base_keeps_the_configured_one(slim_digits_teacher):
    module = PWKD(
        student="resnet8",
        teacher="resnet20",
        teacher_weights=str(slim_digits_teacher),
        terms=[KDTerm()],
        num_classes=10,
        in_chans=1,
        image_size=16,
        stage_widths=[0.5, 1.0],
    )
    trainer = SimpleNamespace(max_epochs=8)
    StagePlan(lr="monotone").setup(trainer, module, "fit")
    assert module.lr_factor(4) == pytest.approx(0.5)  # no restart at the boundary
    StagePlan().setup(trainer, module, "fit")
    assert module.lr_factor(4) == pytest.approx(1.0)
    assert module.lr_factor(2) == pytest.approx(0.5)
    module.lr_schedule = MultiStep([6])
    StagePlan(lr="base").setup(trainer, module, "fit")
    assert [module.lr_factor(e) for e in range(8)] == [module.lr_schedule(e) for e in range(8)]


def fitnet_crd_config(tmp_path) -> str:
    terms = [
        {"class_path": "distill.losses.FitNetTerm"},
        {"class_path": "distill.losses.CRDTerm", "init_args": {"num_negatives": 32}},
    ]
    return write_config(tmp_path / "terms.yaml", {"model": {"init_args": {"ce_weight": 1.0, "terms": terms}}})


def assert_same_training_state(straight: dict, resumed: dict) -> None:
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed["state_dict"][key]), key
        else:  # CRD's memory banks (the teacher's is reset at the stage boundary)
            for name in ("memory_s", "memory_t"):
                assert torch.equal(value[name], resumed["state_dict"][key][name]), f"{key}.{name}"
    assert straight["pwkd_stage"] == resumed["pwkd_stage"] == 1


@pytest.mark.slow
def test_resume_in_stage_two_equals_uninterrupted(in_tmp, slim_digits_teacher):
    terms = fitnet_crd_config(in_tmp)
    stages = stages_config(in_tmp, [0.5, 1.0], [2, 2])
    args = pwkd_digits_args(slim_digits_teacher, terms, stages, epochs=4)
    main([*args, "--trainer.logger.init_args.name=straight"])
    straight = torch.load(in_tmp / "runs/straight/version_0/checkpoints/last.ckpt", weights_only=True)
    assert "terms.0.regressor.whole.conv.weight" in straight["state_dict"]  # FitNet's sliced regressor
    # stopped in the middle of stage 2 (after epoch 3 of 4), and just before it (its CRD reset still to come)
    for stop_step, epochs_done in ((6, 3), (4, 2)):
        name = f"stop{stop_step}"
        main([*args, f"--trainer.logger.init_args.name={name}", f"--trainer.max_steps={stop_step}"])
        first = in_tmp / f"runs/{name}/version_0/checkpoints/last.ckpt"
        assert torch.load(first, weights_only=True)["epoch"] == epochs_done - 1
        main([*args, f"--ckpt_path={first}"])
        assert_same_training_state(straight, torch.load(first, weights_only=True))
    other = stages_config(in_tmp, [0.5, 1.0], [1, 3], name="other")
    with pytest.raises(ValueError, match=r"stages.epochs\[0\]=1 \(the checkpoint has 2\)"):
        build_cli([*pwkd_digits_args(slim_digits_teacher, terms, other, epochs=4), f"--ckpt_path={first}"])


def test_fresh_connectors_one_per_stage(slim_digits_teacher):
    module = PWKD(
        student="resnet8",
        teacher="resnet20",
        teacher_weights=str(slim_digits_teacher),
        terms=[FitNetTerm()],
        num_classes=10,
        in_chans=1,
        image_size=16,
        connectors="fresh",
        stage_widths=[0.25, 1.0, 1.0],
    )
    regressor = module.terms[0].regressor
    assert isinstance(regressor, PerStageConnector)
    assert [m.conv.out_channels for m in regressor.per_stage] == [8, 32, 32]
    assert not torch.equal(regressor.per_stage[1].conv.weight, regressor.per_stage[2].conv.weight)  # not shared
    module.train()
    module.enter_stage(2, 1.0)
    losses, _ = module.training_losses(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)), torch.arange(8))
    losses["fitnet"].backward()
    assert [m.conv.weight.grad is not None for m in regressor.per_stage] == [False, False, True]


def test_connectors_follow_the_teacher_width(slim_digits_teacher):
    module = PWKD(
        student="resnet8",
        teacher="resnet20",
        teacher_weights=str(slim_digits_teacher),
        terms=[FitNetTerm(), CRDTerm(num_negatives=8)],
        num_classes=10,
        in_chans=1,
        image_size=16,
        stage_widths=[0.25, 1.0],
    )
    module.terms[1].setup_data(torch.arange(40) % 10)
    regressor, embed_t = module.terms[0].regressor, module.terms[1].embed_t
    assert isinstance(regressor, SlicedConnector) and isinstance(embed_t, SlicedConnector)
    assert not isinstance(module.terms[1].embed_s, SlicedConnector)  # sized by the student only
    module.train()
    memory_t = memory_s = None
    for stage, width in enumerate((0.25, 1.0)):
        module.enter_stage(stage, width)
        if stage:  # entering stage 1 resets the teacher memory
            assert not torch.equal(module.terms[1].memory.memory_t, memory_t)
            assert torch.equal(module.terms[1].memory.memory_s, memory_s)
        losses, _ = module.training_losses(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)), torch.arange(8))
        sum(losses.values()).backward()
        rows = (regressor.whole.conv.weight.grad.abs().sum((1, 2, 3)) > 0).sum().item()
        assert rows == (8 if width == 0.25 else 32)  # the regressor's outputs match the teacher's hint channels
        memory_t, memory_s = module.terms[1].memory.memory_t.clone(), module.terms[1].memory.memory_s.clone()
        module.zero_grad()


# ---- the CLI on fake CIFAR-100 ------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=2, per_class_test=1)


@pytest.fixture(scope="module")
def slim_cifar_teacher(tmp_path_factory):
    """A random slimmable resnet56 where the pwkd config expects it: a finished run of
    runs/cifar100/slimmablesupervised/resnet56 (its summary.json and last.ckpt at the same step)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("runs_root")
    path = root / "runs/cifar100/slimmablesupervised/resnet56/version_0/checkpoints/last.ckpt"
    path.parent.mkdir(parents=True)
    state = {f"model.{k}": v for k, v in make_slimmable(create_model("resnet56")).state_dict().items()}
    torch.save({"state_dict": state, "global_step": 0}, path)
    (path.parent.parent / "summary.json").write_text('{"global_step": 0}')
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "fitnet"])
def test_pwkd_over_a_base_method_runs_through_cli_on_fake_cifar(
    tmp_path, monkeypatch, fake_cifar, slim_cifar_teacher, method
):
    monkeypatch.chdir(slim_cifar_teacher)  # the {teacher} template resolves relative to the run directory
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "cifar100/pairs/resnet56_resnet20.yaml"),
            "--config",
            str(CONFIGS / f"methods/{method}.yaml"),
            "--config",
            str(CONFIGS / "pwkd/cifar100/pwkd.yaml"),
            f"--data.init_args.data_dir={fake_cifar}",
            "--data.init_args.verify_md5=false",
            "--data.init_args.batch_size=16",
            "--data.init_args.num_workers=0",
            "--trainer.max_epochs=4",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            *FAST,
        ]
    )
    run = tmp_path / "cifar100/pwkd/resnet56-resnet20/version_0"
    rows = read_metrics(run)
    assert [r["pwkd/teacher_width"] for r in rows if "pwkd/teacher_width" in r] == [0.25, 0.5, 0.75, 1.0]
    assert all(math.isfinite(r["train/loss_step"]) for r in rows if "train/loss_step" in r)
    assert f"train/loss_{method}_step" in {k for r in rows for k in r}
    ckpt = torch.load(next((tmp_path / "cifar100").glob("**/last.ckpt")), weights_only=True)
    assert not any(k.startswith("teacher") for k in ckpt["state_dict"])
    assert ckpt["distill_teacher"]["widths"] == [0.25, 0.5, 0.75, 1.0]


# ---- start-up errors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stage_widths": [0.5, 0.25, 1.0]}, "do not decrease"),
        ({"stage_widths": [0.25, 0.5]}, "end at 1.0"),
        ({"stage_widths": [0.25, 1.0], "reverse_order": True}, "start at 1.0"),
        ({"stage_widths": [0.0, 1.0]}, r"stage_widths=0.0: expected a fraction in \(0, 1\]"),
        ({"connectors": "shared"}, "connectors='shared': expected one of 'sliced', 'fresh'"),
    ],
)
def test_bad_stage_widths_fail_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PWKD(num_classes=10, in_chans=1, image_size=16, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": [2, 0]}, r"epochs=\[2, 0\]: expected a list of integers > 0"),
        ({"lr": "steps"}, "lr='steps': expected one of 'own', 'base', 'cyclic', 'step', 'monotone'"),
        ({"min_lr_factor": 2.0}, r"min_lr_factor=2.0: expected a fraction in \[0, 1\]"),
    ],
)
def test_bad_stage_plans_fail_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StagePlan(**kwargs)


@pytest.mark.slow
def test_bad_configs_fail_at_construction_or_setup(tmp_path, slim_digits_teacher):
    half = make_slimmable(create_model("resnet20", num_classes=10, in_chans=1), widths=(0.5, 1.0), image_size=16)
    torch.save(half.state_dict(), tmp_path / "half.pt")
    torch.save(create_model("resnet20", num_classes=10, in_chans=1).state_dict(), tmp_path / "plain.pt")
    trainer = SimpleNamespace(max_epochs=4)

    def pwkd(weights, widths):
        return PWKD(
            student="resnet8",
            teacher="resnet20",
            teacher_weights=str(weights),
            terms=[KDTerm()],
            num_classes=10,
            in_chans=1,
            image_size=16,
            stage_widths=widths,
        )

    with pytest.raises(ValueError, match=r"widths \[0.25\] are not widths the teacher was trained at"):
        pwkd(tmp_path / "half.pt", [0.25, 0.5, 1.0])
    with pytest.raises(ValueError, match=r"widths \[0.5\] are not widths"):  # an ordinary teacher: whole width only
        pwkd(tmp_path / "plain.pt", [0.5, 1.0])
    pwkd(tmp_path / "plain.pt", [1.0, 1.0])  # whole-only works with it
    module = pwkd(slim_digits_teacher, [0.5, 1.0])
    with pytest.raises(ValueError, match=r"sum to 3, but trainer.max_epochs=4"):
        StagePlan(epochs=[1, 2]).setup(trainer, module, "fit")
    thin = pwkd(slim_digits_teacher, [0.25, 0.5, 1.0])
    with pytest.raises(ValueError, match=r"trainer.max_epochs=2 cannot be split among the 3 stages"):
        StagePlan().setup(SimpleNamespace(max_epochs=2), thin, "fit")
    assert stage_epochs(thin.stages(), 4) == [2, 1, 1]
    with pytest.raises(ValueError, match="needs the distill.callbacks.StagePlan callback"):
        thin.setup("fit")


@pytest.mark.slow
def test_bad_stage_epochs_stop_the_cli_before_training(in_tmp, slim_digits_teacher):
    cfg = stages_config(in_tmp, [0.5, 1.0], [1, 1])
    with pytest.raises(ValueError, match="sum to 2, but trainer.max_epochs=4"):
        build_cli(pwkd_digits_args(slim_digits_teacher, cfg, epochs=4))
    assert not list(in_tmp.glob("runs/**/*.ckpt"))


@pytest.mark.ddp
# ---- DDP ----------------------------------------------------------------------------------------
def test_two_process_ddp_keeps_ranks_identical(tmp_path, slim_digits_teacher):
    args = pwkd_digits_args(slim_digits_teacher, fitnet_crd_config(tmp_path), epochs=4) + [
        "--trainer.limit_train_batches=3"
    ]
    rank0, rank1 = run_two_ranks(args, tmp_path)
    assert "terms.0.regressor.whole.conv.weight" in rank0
    assert_same_tensors(rank0, rank1)


# ---- ablation: separately trained narrow teachers ----------------------------------------------
def test_narrow_teacher_trains_its_width_alone():
    """train_widths=[0.5]: gradients reach only the 0.5 sub-network (leading slices, its own BatchNorms)."""
    torch.manual_seed(0)
    module = SlimmableSupervised(
        model="resnet20", widths=[0.5, 1.0], train_widths=[0.5], num_classes=10, in_chans=1, image_size=16
    )
    used = {}  # (output, input) channels each conv/linear really ran with

    def record(layer, inputs, output):
        used[layer] = (output.shape[1], inputs[0].shape[1] // getattr(layer, "groups", 1))

    hooks = [m.register_forward_hook(record) for m in module.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    module.train()
    losses, logits = module.training_losses(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)), None)
    for hook in hooks:
        hook.remove()
    assert set(losses) == {"ce"} and logits.shape == (8, 10)
    sum(losses.values()).backward()
    for layer, (out_ch, in_ch) in used.items():
        grad = layer.weight.grad
        assert grad[:out_ch, :in_ch].abs().sum() > 0
        assert not grad[out_ch:].any() and not grad[:, in_ch:].any()
    for name, layer in module.model.named_modules():
        if isinstance(layer, nn.BatchNorm2d) and ".per_width." not in name + ".":
            assert layer.weight.grad is None, name  # the whole width's own BatchNorms: untouched
            assert layer.per_width["w0_5"].weight.grad.abs().sum() > 0, name
    module.eval()
    set_width(module.model, 0.5)
    expected = module.model(torch.ones(2, 1, 16, 16))
    assert module.eval_names == ("main",)
    assert torch.equal(module.eval_logits(torch.ones(2, 1, 16, 16))["main"], expected)  # val/top1 is the 0.5 width
    assert get_width(module.model) == 1.0
    with pytest.raises(ValueError, match=r"train_widths \[0.25\] must be some of the widths \[0.5, 1.0\]"):
        SlimmableSupervised(model="resnet20", widths=[0.5, 1.0], train_widths=[0.25], num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match="sandwich needs the whole width"):
        SlimmableSupervised(model="resnet20", widths=[0.5, 1.0], train_widths=[0.5], sandwich=True, num_classes=10)


@pytest.fixture(scope="module")
def narrow_digits_teachers(tmp_path_factory):
    """Two resnet20 digits teachers as separately trained ones would be saved: a Lightning-style
    checkpoint of a slimmable network trained at 0.5 only, and an ordinary network (width 1.0)."""
    folder = tmp_path_factory.mktemp("narrow")
    torch.manual_seed(1)
    half = make_slimmable(create_model("resnet20", num_classes=10, in_chans=1), widths=(0.5, 1.0), image_size=16)
    state = {f"model.{k}": v for k, v in half.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"train_widths": [0.5]}}, folder / "resnet20-w0_5.ckpt")
    torch.manual_seed(2)
    torch.save(create_model("resnet20", num_classes=10, in_chans=1).state_dict(), folder / "resnet20.pt")
    return [str(folder / "resnet20-w0_5.ckpt"), str(folder / "resnet20.pt")]


class StageTeacherRecorder(pl.Callback):
    """Per training step: which stage teacher the module distills from, and at which width."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        index = next(k for k, t in enumerate(pl_module.stage_teachers) if t is pl_module.teacher)
        self.steps.append((index, get_width(pl_module.teacher)))


def narrow_args(tmp_path, teachers) -> list[str]:
    """PWKD (FitNet) on the digits, stages 0.5 then 1.0, each from its own teacher file."""
    config = write_config(
        tmp_path / "narrow.yaml",
        {
            "model": {
                "init_args": {
                    "teacher_weights": None,
                    "stage_teacher_weights": teachers,
                    "terms": [{"class_path": "distill.losses.FitNetTerm"}],
                }
            }
        },
    )
    stages = stages_config(tmp_path, [0.5, 1.0], [2, 2], {"class_path": "test_pwkd.StageTeacherRecorder"})
    return [
        "fit",
        "--config",
        str(CONFIGS / "digits/pair.yaml"),
        "--config",
        str(CONFIGS / "digits/pwkd.yaml"),
        "--config",
        config,
        "--config",
        stages,
        "--trainer.max_epochs=4",
        *FAST,
    ]


@pytest.mark.slow
def test_stage_teachers_take_turns_and_resume_exactly(in_tmp, narrow_digits_teachers):
    args = narrow_args(in_tmp, narrow_digits_teachers)
    cli = build_cli([*args, "--trainer.logger.init_args.name=straight"])
    steps = next(cb for cb in cli.trainer.callbacks if isinstance(cb, StageTeacherRecorder)).steps
    assert steps == [(0, 0.5)] * 4 + [(1, 1.0)] * 4  # 2 stages × 2 epochs × 2 batches
    straight = torch.load(in_tmp / "runs/straight/version_0/checkpoints/last.ckpt", weights_only=True)
    record = straight["distill_teacher"]
    assert record["sha256"] == [file_sha256(path) for path in narrow_digits_teachers]
    assert record["widths"] == [[0.5], [1.0]]
    assert "terms.0.regressor.whole.conv.weight" in straight["state_dict"]  # FitNet's regressor follows the width
    main([*args, "--trainer.logger.init_args.name=stop", "--trainer.max_steps=6"])  # stopped in stage 2
    first = in_tmp / "runs/stop/version_0/checkpoints/last.ckpt"
    main([*args, f"--ckpt_path={first}"])
    assert_same_training_state(straight, torch.load(first, weights_only=True))


@pytest.mark.slow
def test_stage_teacher_mistakes_are_named(tmp_path, narrow_digits_teachers):
    half, plain = narrow_digits_teachers

    def pwkd(**kwargs):
        return PWKD(
            student="resnet8", teacher="resnet20", terms=[KDTerm()], num_classes=10, in_chans=1, image_size=16, **kwargs
        )

    with pytest.raises(ValueError, match="teacher_weights or stage_teacher_weights, not both"):
        pwkd(teacher_weights=plain, stage_teacher_weights=[half, plain])
    with pytest.raises(ValueError, match=r"2 stage_teacher_weights for 3 stage_widths \[0.25, 0.5, 1.0\]"):
        pwkd(stage_teacher_weights=[half, plain], stage_widths=[0.25, 0.5, 1.0])
    with pytest.raises(
        ValueError, match=rf"stage 1 runs its teacher at width 1.0, but {half} was trained at widths \[0.5\]"
    ):
        pwkd(stage_teacher_weights=[half, half], stage_widths=[0.5, 1.0])
    with pytest.raises(ValueError, match=r"widths \[1.0\] are not widths the teacher was trained at \(\[0.5\]"):
        pwkd(teacher_weights=half, stage_widths=[0.5, 1.0])  # a narrow one is no slimmable teacher


@pytest.mark.slow
@pytest.mark.parametrize("ablation", sorted(p.stem for p in (CONFIGS / "pwkd/cifar100/ablations").glob("*.yaml")))
def test_ablation_configs_compose_with_a_pair_and_a_method(ablation, capsys):
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "cifar100/pairs/resnet32x4_resnet8x4.yaml"),
                "--config",
                str(CONFIGS / "methods/kd.yaml"),
                "--config",
                str(CONFIGS / "pwkd/cifar100/pwkd.yaml"),
                "--config",
                str(CONFIGS / f"pwkd/cifar100/ablations/{ablation}.yaml"),
                "--print_config",
            ]
        )
    assert stop.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "distill.methods.PWKD"
    assert config["stages"]["lr"] in ("own", "monotone", "base")


@pytest.mark.slow
def test_ablations_stack(capsys):
    """Two ablation files combine: each sets only its own fields of the model or the stage plan."""
    ablations = CONFIGS / "pwkd/cifar100/ablations"
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                *("--config", str(CONFIGS / "cifar100/pairs/resnet32x4_resnet8x4.yaml")),
                *("--config", str(CONFIGS / "methods/kd.yaml")),
                *("--config", str(CONFIGS / "pwkd/cifar100/pwkd.yaml")),
                *("--config", str(ablations / "whole_only.yaml")),
                *("--config", str(ablations / "monotone.yaml")),
                "--stages.warmup_epochs=2",
                "--print_config",
            ]
        )
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["init_args"]["stage_widths"] == [1.0] * 4
    assert (config["stages"]["lr"], config["stages"]["warmup_epochs"]) == ("monotone", 2.0)


def test_a_missing_stage_teacher_names_its_argument(tmp_path, narrow_digits_teachers):
    with pytest.raises(
        FileNotFoundError,
        match=r"missing.ckpt' \(resnet20\) does not exist: .* set model.init_args.stage_teacher_weights",
    ):
        PWKD(
            student="resnet8",
            teacher="resnet20",
            terms=[KDTerm()],
            num_classes=10,
            in_chans=1,
            image_size=16,
            stage_teacher_weights=[narrow_digits_teachers[0], str(tmp_path / "missing.ckpt")],
        )
