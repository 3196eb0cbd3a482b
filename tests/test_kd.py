"""The offline KD engine: frozen teacher, gradient routing, resume, every base method, DDP."""

from pathlib import Path

import pytest
import torch
from fakedata import write_fake_cifar100
from helpers import CONFIGS, FAST
from rank_dump import assert_same_tensors, run_two_ranks

from distill.cli import main
from distill.losses import CRDTerm, FitNetTerm, KDTerm
from distill.methods import OfflineKD
from distill.models import create_model
from distill.tools.runs import read_metrics

METHODS = ["kd", "fitnet", "at", "sp", "rkd", "pkt", "crd", "dkd", "crd_kd"]


@pytest.fixture
def digits_teacher(tmp_path):
    """A random resnet20 teacher for the digits, saved as a plain state_dict."""
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    torch.save(create_model("resnet20", num_classes=10, in_chans=1).state_dict(), path)
    return path


def fit_digits(method: str, teacher: Path, epochs: int = 1, *extra: str):
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits/pair.yaml"),
            "--config",
            str(CONFIGS / f"methods/{method}.yaml"),
            f"--model.init_args.teacher_weights={teacher}",
            f"--trainer.max_epochs={epochs}",
            *FAST,
            *extra,
        ]
    )


@pytest.mark.slow
def test_teacher_is_frozen_and_kept_out_of_checkpoint(in_tmp, digits_teacher):
    before = torch.load(digits_teacher, weights_only=True)
    fit_digits("kd", digits_teacher)
    run = in_tmp / "runs/digits/offlinekd/resnet20-resnet8/version_0"
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert not any(k.startswith("teacher") for k in ckpt["state_dict"])
    assert ckpt["distill_teacher"]["weights"] == str(digits_teacher)
    rows = read_metrics(run)
    assert any("val/teacher_top1" in r for r in rows)  # measured in the first validation
    assert torch.load(digits_teacher, weights_only=True).keys() == before.keys()


def test_teacher_weights_bit_identical_after_fit(digits_teacher):
    module = OfflineKD(
        student="resnet8",
        teacher="resnet20",
        teacher_weights=str(digits_teacher),
        terms=[KDTerm()],
        num_classes=10,
        in_chans=1,
        image_size=16,
    )
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    images, targets = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    module.train()
    assert not module.teacher.training
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(2):
        losses, _ = module.training_losses(images, targets, torch.arange(8))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # BN running statistics included


def test_gradients_reach_student_and_connectors_only(digits_teacher):
    terms = [KDTerm(), FitNetTerm(), CRDTerm(num_negatives=16)]
    module = OfflineKD(
        student="resnet8",
        teacher="resnet20",
        teacher_weights=str(digits_teacher),
        terms=terms,
        num_classes=10,
        in_chans=1,
        image_size=16,
    )
    module.terms[2].setup_data(torch.arange(40) % 10)
    module.train()
    losses, _ = module.training_losses(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)), torch.arange(8))
    sum(losses.values()).backward()
    assert set(losses) == {"ce", "kd", "fitnet", "crd"}
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert {n.split(".")[0] for n, _ in module.named_parameters()} == {"student", "terms"}
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())


@pytest.mark.slow
def test_resumed_kd_run_equals_uninterrupted(tmp_path, digits_teacher, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit_digits("kd", digits_teacher, 2, "--trainer.logger.init_args.name=straight")
    fit_digits("kd", digits_teacher, 1, "--trainer.logger.init_args.name=split")
    first = tmp_path / "runs/split/version_0/checkpoints/last.ckpt"
    fit_digits("kd", digits_teacher, 2, f"--ckpt_path={first}")
    straight = torch.load(tmp_path / "runs/straight/version_0/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    resumed = torch.load(first, weights_only=True)["state_dict"]
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    return write_fake_cifar100(root, per_class_train=2, per_class_test=1)


@pytest.fixture(scope="module")
def cifar_teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet56.pt"
    torch.save(create_model("resnet56").state_dict(), path)
    return path


def cifar_args(fake_cifar, teacher, method):
    teacher_arg = [] if method == "dml" else [f"--model.init_args.teacher_weights={teacher}"]  # DML has none
    return [
        "fit",
        "--config",
        str(CONFIGS / "cifar100/pairs/resnet56_resnet20.yaml"),
        "--config",
        str(CONFIGS / f"methods/{method}.yaml"),
        *teacher_arg,
        f"--data.init_args.data_dir={fake_cifar}",
        "--data.init_args.verify_md5=false",
        "--data.init_args.batch_size=16",
        "--data.init_args.num_workers=0",
        "--trainer.max_epochs=1",
        *FAST,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_base_method_runs_through_cli_on_fake_cifar(in_tmp, fake_cifar, cifar_teacher, method):
    main(cifar_args(fake_cifar, cifar_teacher, method))
    rows = read_metrics(in_tmp / "runs/cifar100/offlinekd/resnet56-resnet20/version_0")
    logged = {k for r in rows for k in r}
    expected = {"train/loss_ce_step", "val/top1"} | {f"train/loss_{m}_step" for m in method.split("_")}
    assert expected <= logged
    assert all(torch.isfinite(torch.tensor(r["train/loss_step"])) for r in rows if "train/loss_step" in r)


@pytest.mark.ddp
@pytest.mark.parametrize("method", ["kd", "crd", "dml"])
def test_two_process_ddp_keeps_ranks_identical(tmp_path, fake_cifar, cifar_teacher, method):
    args = cifar_args(fake_cifar, cifar_teacher, method) + ["--trainer.limit_train_batches=3"]
    assert_same_tensors(*run_two_ranks(args, tmp_path))
