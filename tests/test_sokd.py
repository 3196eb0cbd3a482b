"""SOKD: the knowledge bridge module, the loss directions and gradient routing, resume, export, DDP."""

import copy
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from fakedata import write_fake_cifar100
from helpers import CONFIGS, FAST
from rank_dump import assert_same_tensors, run_two_ranks

from distill.cli import build_cli, main
from distill.data import DigitsDataModule
from distill.losses import FitNetTerm
from distill.methods import OfflineKD
from distill.methods.sokd import KBM_LOSSES, SOKD, sokd_losses
from distill.models import WeightLoadError, create_model, load_weights
from distill.tools.improved_teacher import export_improved_teacher
from distill.tools.runs import read_metrics, series

DIGITS = dict(num_classes=10, in_chans=1, image_size=16)


class DumpStudentKBMTeacherPerRank(pl.Callback):
    """Every rank saves its state_dict (student, KBM) and its teacher's buffers (DDP test)."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        state.update({f"teacher.{k}": v.detach().cpu().clone() for k, v in pl_module.teacher.named_buffers()})
        torch.save(state, self.out_dir / f"rank{trainer.global_rank}.pt")


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """A resnet20 for the digits, briefly fitted so its BatchNorm statistics are not the initial ones."""
    torch.manual_seed(0)
    model = create_model("resnet20", **{k: DIGITS[k] for k in ("num_classes", "in_chans")})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        loss = F.cross_entropy(model(torch.randn(16, 1, 16, 16)), torch.randint(0, 10, (16,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("teacher") / "resnet20.pt"
    torch.save(model.state_dict(), path)
    return path


def sokd(teacher_weights, teacher="resnet20", student="resnet8", **kwargs):
    torch.manual_seed(0)
    return SOKD(
        student=student,
        teacher=teacher,
        teacher_weights=str(teacher_weights) if teacher_weights else None,
        **{**DIGITS, **kwargs},
    )


# ---- the knowledge bridge module -----------------------------------------------------------------
@pytest.mark.parametrize(
    "teacher, bridged",
    [
        ("resnet20", {"layer3", "fc"}),
        ("wrn_16_2", {"block3", "bn1", "fc"}),  # bn1: WRN's final norm, in the head
        ("vgg8", {"block4", "classifier"}),
        ("resnet18", {"layer4", "fc"}),  # ImageNet ResNet: bridge = layer4 + fc
    ],
)
def test_kbm_is_a_fresh_copy_of_the_last_stage_and_head(teacher, bridged):
    module = sokd(None, teacher=teacher)
    kbm, tstate = module.kbm.net.state_dict(), module.teacher.state_dict()
    assert kbm.keys() == {k for k in tstate if k.split(".")[0] in bridged}
    assert all(kbm[k].shape == tstate[k].shape for k in kbm)
    teacher_ids = {id(p) for p in module.teacher.parameters()}
    teacher_storage = {p.data_ptr() for p in module.teacher.parameters()}
    assert not any(id(p) in teacher_ids or p.data_ptr() in teacher_storage for p in module.kbm.parameters())
    assert all(p.requires_grad for p in module.kbm.parameters())
    assert not any(p.requires_grad for p in module.teacher.parameters())
    module.eval()
    with torch.no_grad():
        t = module.teacher(torch.randn(2, 1, 16, 16), features=True)
        a = module.kbm(t.stages[-2])
    assert a.logits.shape == t.logits.shape == (2, 10)
    assert [x.shape for x in a.stages] == [t.stages[-1].shape]
    assert a.feature.shape == t.feature.shape and a.embedding.shape == t.embedding.shape


def test_kbm_init_random_is_new_and_copy_reproduces_the_teacher(digits_teacher):
    images = torch.randn(4, 1, 16, 16)
    random_init, copied = sokd(digits_teacher), sokd(digits_teacher, kbm_init="copy")
    weight = "layer3.0.conv1.weight"
    assert not torch.equal(random_init.kbm.net.state_dict()[weight], random_init.teacher.state_dict()[weight])
    copied.eval()
    logits = copied.eval_logits(images)
    assert torch.equal(logits["kbm"], logits["teacher"])  # the improved teacher starts as the teacher


def test_bridge_stage_moves_the_bridge_and_bad_values_fail_naming_the_key():
    module = sokd(None, bridge_stage=-2)
    assert {k.split(".")[0] for k in module.kbm.net.state_dict()} == {"layer2", "layer3", "fc"}
    for value in (0, 3, -3):
        with pytest.raises(ValueError, match=f"bridge_stage .* 3 stages; got {value}"):
            sokd(None, bridge_stage=value)
    with pytest.raises(ValueError, match="SOKD teacher_bn='frozen': expected one of 'train', 'eval'"):
        sokd(None, teacher_bn="frozen")
    with pytest.raises(ValueError, match="SOKD kbm_init='zeros': expected one of 'random', 'copy'"):
        sokd(None, kbm_init="zeros")


# ---- the losses --------------------------------------------------------------------------------
def test_kl_directions_and_tau_squared_match_a_hand_computation():
    torch.manual_seed(1)
    z_s, z_a, z_t = (torch.randn(5, 7) * 3 for _ in range(3))
    y = torch.randint(0, 7, (5,))
    tau = 4.0

    def kl(p_logits, q_logits):  # τ² · KL(softmax(p/τ) ‖ softmax(q/τ)), batch mean
        p, log_p, log_q = (
            F.softmax(p_logits / tau, 1),
            F.log_softmax(p_logits / tau, 1),
            F.log_softmax(q_logits / tau, 1),
        )
        return tau**2 * (p * (log_p - log_q)).sum(1).mean()

    got = sokd_losses(z_s, z_a, z_t, y, tau)
    expected = {"kl": kl(z_a, z_s), "kbm_kl_teacher": kl(z_t, z_a), "kbm_kl_student": kl(z_s, z_a)}
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=1e-5), name
    assert not torch.allclose(kl(z_s, z_a), kl(z_a, z_s), rtol=1e-2)  # swapped arguments would fail
    assert torch.allclose(got["ce"], F.cross_entropy(z_s, y)) and torch.allclose(got["kbm_ce"], F.cross_entropy(z_a, y))
    weighted = sokd_losses(z_s, z_a, z_t, y, tau, 2.0, 3.0, 5.0, 7.0, 11.0)
    for name, factor in zip(["ce", "kl", "kbm_ce", "kbm_kl_teacher", "kbm_kl_student"], [2, 3, 5, 7, 11]):
        assert torch.allclose(weighted[name], factor * got[name]), name


def test_student_and_kbm_losses_reach_only_their_own_network(digits_teacher):
    module = sokd(digits_teacher, terms=[FitNetTerm(student_stage=-1, teacher_stage=-1)])  # target from the KBM
    module.train()
    losses, _ = module.training_losses(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)), torch.arange(8))
    assert set(losses) == {"ce", "kl", "fitnet", *KBM_LOSSES}
    student_loss = sum(v for k, v in losses.items() if k not in KBM_LOSSES)
    kbm_loss = sum(losses[k] for k in KBM_LOSSES)
    student, kbm = list(module.student.parameters()), list(module.kbm.parameters())
    assert all(g is None for g in torch.autograd.grad(student_loss, kbm, retain_graph=True, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(kbm_loss, student, retain_graph=True, allow_unused=True))
    assert all(g is not None for g in torch.autograd.grad(student_loss, student, retain_graph=True, allow_unused=True))
    assert all(g is not None for g in torch.autograd.grad(kbm_loss, kbm, retain_graph=True, allow_unused=True))
    (student_loss + kbm_loss).backward()
    assert all(p.grad is None for p in module.teacher.parameters())


@pytest.mark.parametrize("teacher_bn", ["train", "eval"])
def test_teacher_weights_stay_and_bn_buffers_follow_teacher_bn(digits_teacher, teacher_bn):
    module = sokd(digits_teacher, teacher_bn=teacher_bn)
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    module.train()
    assert module.teacher.training == (teacher_bn == "train")
    optimizer = torch.optim.SGD(module.param_groups(), lr=0.1)
    for _ in range(2):
        losses, _ = module.training_losses(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)), torch.arange(8))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    after = module.teacher.state_dict()
    assert all(torch.equal(after[k], before[k]) for k, _ in module.teacher.named_parameters())
    moved = [k for k, _ in module.teacher.named_buffers() if not torch.equal(after[k], before[k])]
    assert bool(moved) == (teacher_bn == "train")
    module.eval()
    assert not module.teacher.training


def test_zero_kl_weights_reduce_to_independent_ce_training(digits_teacher):
    module = sokd(digits_teacher, kl_weight=0.0, kbm_teacher_kl_weight=0.0, kbm_student_kl_weight=0.0)
    student, kbm, teacher = (copy.deepcopy(m) for m in (module.student, module.kbm, module.teacher))
    for net in (module, student, kbm, teacher):
        net.train()
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    joint = torch.optim.SGD(module.param_groups(), **hyper)
    alone_s, alone_a = torch.optim.SGD(student.parameters(), **hyper), torch.optim.SGD(kbm.parameters(), **hyper)
    torch.manual_seed(2)
    for _ in range(3):
        images, targets = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
        losses, _ = module.training_losses(images, targets, torch.arange(8))
        joint.zero_grad()
        torch.stack(list(losses.values())).sum().backward()
        joint.step()
        with torch.no_grad():
            bridge = teacher(images, features=True).stages[-2]
        for net, x, optimizer in ((student, images, alone_s), (kbm, bridge, alone_a)):
            out = net(x)
            optimizer.zero_grad()
            F.cross_entropy(out if isinstance(out, torch.Tensor) else out.logits, targets).backward()
            optimizer.step()
    for joint_net, alone in ((module.student, student), (module.kbm, kbm)):
        for (name, a), b in zip(joint_net.state_dict().items(), alone.state_dict().values()):
            assert torch.equal(a, b), name


def test_param_groups_split_student_and_kbm_with_their_own_lr(digits_teacher):
    module = sokd(digits_teacher, kbm_lr=0.2, lr=0.1)
    student_group, kbm_group = module.param_groups()
    assert {id(p) for p in kbm_group["params"]} == {id(p) for p in module.kbm.parameters()}
    assert {id(p) for p in student_group["params"]} == {id(p) for p in module.student.parameters()}
    assert kbm_group["lr"] == pytest.approx(0.2) and "lr" not in student_group


# ---- runs through the CLI ----------------------------------------------------------------------
def fit_digits(teacher, epochs, *extra):
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits/pair.yaml"),
            "--config",
            str(CONFIGS / "digits/sokd.yaml"),
            f"--model.init_args.teacher_weights={teacher}",
            f"--trainer.max_epochs={epochs}",
            *FAST,
            "--trainer.limit_val_batches=1.0",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory, digits_teacher):
    """Two epochs straight, and one epoch then resumed to two (teacher_bn=train, the default)."""
    root = tmp_path_factory.mktemp("runs")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        fit_digits(digits_teacher, 2, "--trainer.logger.init_args.name=straight")
        fit_digits(digits_teacher, 1, "--trainer.logger.init_args.name=split")
        split = root / "runs/split/version_0/checkpoints/last.ckpt"
        fit_digits(digits_teacher, 2, f"--ckpt_path={split}")
    finally:
        os.chdir(cwd)
    return root / "runs/straight/version_0", root / "runs/split/version_0"


@pytest.mark.slow
def test_resume_with_train_mode_teacher_equals_uninterrupted(digits_runs, digits_teacher):
    straight, resumed = (torch.load(run / "checkpoints/last.ckpt", weights_only=True) for run in digits_runs)
    assert resumed["global_step"] == straight["global_step"] == 4
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    assert any(k.startswith("kbm.") for k in straight["state_dict"])
    assert not any(k.startswith("teacher") for k in straight["state_dict"])
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    buffers = straight["distill_sokd"]["teacher_buffers"], resumed["distill_sokd"]["teacher_buffers"]
    original = torch.load(digits_teacher, weights_only=True)
    assert not torch.equal(buffers[0]["bn1.running_mean"], original["bn1.running_mean"])  # they did move
    for key, value in buffers[0].items():
        assert torch.equal(value, buffers[1][key]), key


@pytest.mark.slow
def test_exported_improved_teacher_reproduces_logged_kbm_top1(digits_runs, tmp_path):
    run = digits_runs[0]
    rows = read_metrics(run)
    logged = series(rows, "val/kbm_top1")[-1][1]
    assert series(rows, "val/teacher_top1") and series(rows, "val/kbm_top1_best") and series(rows, "val/top1")
    out = export_improved_teacher(run / "checkpoints/last.ckpt", tmp_path / "improved.pt")
    model = load_weights(create_model("resnet20", num_classes=10, in_chans=1), out).eval()
    data = DigitsDataModule()
    data.setup("fit")
    correct = total = 0
    with torch.no_grad():
        for images, targets, _ in data.val_dataloader():
            correct += int((model(images).argmax(1) == targets).sum())
            total += len(targets)
    assert correct / total == pytest.approx(logged, abs=1e-6)
    with pytest.raises(WeightLoadError, match="is not the teacher"):
        export_improved_teacher(run / "checkpoints/last.ckpt", tmp_path / "x.pt", teacher_weights=out)
    offline = OfflineKD(
        student="resnet8", teacher="resnet20", teacher_weights=str(out), **DIGITS
    )  # usable as a teacher
    assert torch.equal(offline.teacher.state_dict()["fc.weight"], model.state_dict()["fc.weight"])


@pytest.mark.slow
def test_feature_extension_composes_after_a_cifar_pair_on_fake_data(in_tmp):
    torch.manual_seed(0)
    teacher = in_tmp / "resnet56.pt"
    torch.save(create_model("resnet56").state_dict(), teacher)
    data = write_fake_cifar100(in_tmp / "cifar", per_class_train=1, per_class_test=1)
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "cifar100/pairs/resnet56_resnet20.yaml"),
            "--config",
            str(CONFIGS / "sokd/sokd_fitnet.yaml"),
            f"--model.init_args.teacher_weights={teacher}",
            f"--data.init_args.data_dir={data}",
            "--data.init_args.verify_md5=false",
            "--data.init_args.batch_size=16",
            "--data.init_args.num_workers=0",
            "--trainer.max_epochs=1",
            *FAST,
        ]
    )
    rows = read_metrics(in_tmp / "runs/cifar100/sokd/resnet56-resnet20/version_0")
    logged = {k for r in rows for k in r}
    assert {"train/loss_fitnet_step", "train/loss_kbm_kl_teacher_step", "val/kbm_top1", "val/teacher_top1"} <= logged


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, kbm_parts, lr, milestones",
    [
        ("sokd/official_wrn_40_2_wrn_40_1.yaml", {"block3", "bn1", "fc"}, 0.1, [100, 150]),
        ("sokd/imagenet_resnet34_resnet18.yaml", {"layer4", "fc"}, 0.1, [30, 60, 90]),
    ],
)
def test_recipe_configs_instantiate(in_tmp, config, kbm_parts, lr, milestones):
    cli = build_cli(["--config", str(CONFIGS / config), "--model.init_args.teacher_weights=null"], run=False)
    model = cli.model
    assert isinstance(model, SOKD) and model.temperature == 4.0 and model.teacher_bn == "train"
    assert {k.split(".")[0] for k in model.kbm.net.state_dict()} == kbm_parts
    assert model.lr == lr and model.lr_schedule.milestones == milestones


@pytest.mark.ddp
def test_two_process_ddp_keeps_student_kbm_and_teacher_buffers_identical(tmp_path, digits_teacher):
    args = [
        "fit",
        "--config",
        str(CONFIGS / "digits/pair.yaml"),
        "--config",
        str(CONFIGS / "digits/sokd.yaml"),
        f"--model.init_args.teacher_weights={digits_teacher}",
        "--trainer.max_epochs=1",
        *FAST,
        "--trainer.limit_train_batches=3",
    ]
    rank0, rank1 = run_two_ranks(args, tmp_path, callback="test_sokd.DumpStudentKBMTeacherPerRank")
    assert any(k.startswith("kbm.") for k in rank0)
    assert any(k.startswith("teacher.") and "running_mean" in k for k in rank0)
    assert_same_tensors(rank0, rank1)
