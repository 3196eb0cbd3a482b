"""KR (Liu, Wen, Gao, et al., 2019), the project's reading: aggregation, mask, penalty, matching,
the CLI on fake data, resume and DDP."""

import logging
from pathlib import Path

import pytest
import torch
from fakedata import write_fake_cifar100
from helpers import CONFIGS, FAST
from rank_dump import assert_same_tensors, run_two_ranks

from distill.cli import build_cli, main
from distill.losses.kr import aggregate_weight, prior_penalty, resize_kernel, top_fraction_mask
from distill.methods.kr import KR, match_layers, relative_index
from distill.models import create_model
from distill.tools.runs import read_metrics

DIGITS = dict(num_classes=10, in_chans=1, image_size=16)


def save_random(tmp_path, name, seed, **kwargs):
    torch.manual_seed(seed)
    path = tmp_path / f"{name}.pt"
    torch.save(create_model(name, **kwargs).state_dict(), path)
    return path


# ---- aggregation -------------------------------------------------------------------------------
def test_aggregation_averages_contiguous_groups_by_hand():
    teacher = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]).reshape(4, 3, 1, 1)
    # out groups {0,1}, {2,3}; in groups {0}, {1,2}
    expected = torch.tensor([[(1 + 4) / 2, (2 + 3 + 5 + 6) / 4], [(7 + 10) / 2, (8 + 9 + 11 + 12) / 4]])
    assert torch.equal(aggregate_weight(teacher, 1, (2, 2, 1, 1)).float(), expected.reshape(2, 2, 1, 1))


def test_aggregation_repeats_channels_for_a_wider_student():
    teacher = torch.tensor([2.0, 5.0]).reshape(2, 1, 1, 1)
    assert aggregate_weight(teacher, 1, (3, 1, 1, 1)).flatten().tolist() == [2.0, 2.0, 5.0]


def test_depthwise_aggregation_averages_only_existing_connections():
    teacher = torch.tensor([1.0, 2, 3, 4]).reshape(4, 1, 1, 1)  # depthwise, groups 4
    prior = aggregate_weight(teacher, 4, (2, 1, 1, 1), target_groups=2)
    assert prior.flatten().tolist() == [1.5, 3.5]


def test_kmeans_grouping_averages_clustered_filters():
    rows = torch.tensor([0.0, 10, 0.2, 10.2]).reshape(4, 1, 1, 1)
    prior = aggregate_weight(rows, 1, (2, 1, 1, 1), grouping="kmeans", seed=3)
    assert torch.allclose(prior.flatten(), torch.tensor([0.1, 10.1], dtype=torch.float64))


def test_kernel_crop_average_and_interpolation():
    big = torch.arange(25.0).reshape(1, 1, 5, 5)
    assert torch.equal(resize_kernel(big, (3, 3)), big[..., 1:4, 1:4])
    assert torch.equal(resize_kernel(big, (1, 1), shrink="average"), big.mean().reshape(1, 1, 1, 1))
    assert torch.equal(resize_kernel(torch.full((1, 1, 1, 1), 7.0), (3, 3)), torch.full((1, 1, 3, 3), 7.0))
    small = torch.tensor([[0.0, 2, 4], [6, 8, 10], [12, 14, 16]]).reshape(1, 1, 3, 3)
    grown = resize_kernel(small, (5, 5))[0, 0]
    assert grown[2, 2] == 8 and grown[0, 0] == 0 and grown[4, 4] == 16  # centre and corners kept
    assert grown[0, 1] == 1 and grown[1, 1] == 4  # halfway between taps


# ---- mask and penalty --------------------------------------------------------------------------
def test_mask_keeps_exactly_the_top_fraction():
    torch.manual_seed(0)
    weight = torch.randn(10, 10, 3, 3)
    mask = top_fraction_mask(weight, 0.1)
    assert mask.shape == weight.shape and int(mask.sum()) == 90
    assert weight.abs()[mask].min() > weight.abs()[~mask].max()
    ties = top_fraction_mask(torch.ones(20), 0.25)
    assert ties.nonzero().flatten().tolist() == [0, 1, 2, 3, 4]  # equal magnitudes: lowest indices
    assert top_fraction_mask(weight, 1.0).all()


def test_penalty_gradient_is_zero_outside_the_mask_and_the_same_pull_for_any_layer_size():
    torch.manual_seed(0)
    weights = [torch.randn(4, 3, 3, 3, requires_grad=True), torch.randn(64, 64, 3, 3, requires_grad=True)]
    priors = [torch.randn(w.shape) for w in weights]
    masks = [top_fraction_mask(p, 0.2) for p in priors]
    penalty = prior_penalty(weights, priors, masks)
    penalty.backward()
    expected_value = sum(
        0.5 * float(((w.double() - p.double()) * m).square().sum()) for w, p, m in zip(weights, priors, masks)
    )
    assert penalty.item() == pytest.approx(expected_value, rel=1e-5)
    for w, p, m in zip(weights, priors, masks):
        assert torch.all(w.grad[~m] == 0)
        torch.testing.assert_close(w.grad[m], (w - p)[m].detach())  # β·R pulls like weight decay β·(W − prior)


# ---- matching and priors -----------------------------------------------------------------------
def test_relative_index_maps_ends_to_ends():
    assert [relative_index(i, 3, 9) for i in range(3)] == [0, 4, 8]
    assert [relative_index(i, 6, 18) for i in range(6)] == [0, 3, 7, 10, 14, 17]
    assert relative_index(0, 1, 5) == 0


def test_resnet56_to_resnet20_matching_table():
    table = match_layers(create_model("resnet20"), create_model("resnet56"))
    expected = [("stem", "conv1", "conv1")]
    for stage in (1, 2, 3):
        for block, teacher_block in ((0, 0), (1, 4), (2, 8)):  # relative depth: 3 blocks ↦ 9
            for conv in ("conv1", "conv2"):
                expected.append(
                    (f"stage{stage}", f"layer{stage}.{block}.{conv}", f"layer{stage}.{teacher_block}.{conv}")
                )
            if stage > 1 and block == 0:
                expected.append((f"stage{stage}", f"layer{stage}.0.downsample.0", f"layer{stage}.0.downsample.0"))
    assert [(m.group, m.student, m.teachers[0]) for m in table] == expected
    assert all(len(m.teachers) == 1 and m.penalised for m in table)
    assert all(m.student_shape == m.teacher_shapes[0] for m in table)  # same widths in this pair
    stage = match_layers(create_model("resnet20"), create_model("resnet56"), level="stage")
    conv1 = next(m for m in stage if m.student == "layer1.1.conv1")
    assert conv1.teachers == tuple(f"layer1.{b}.conv1" for b in range(9))


def test_identity_pairing_gives_rescaled_teacher_weights(tmp_path):
    teacher_path = save_random(tmp_path, "resnet8", seed=1, num_classes=10, in_chans=1)
    teacher = torch.load(teacher_path, weights_only=True)
    torch.manual_seed(0)
    module = KR(
        student="resnet8", teacher="resnet8", teacher_weights=str(teacher_path), init_from_prior=False, **DIGITS
    )
    assert len(module.prior_convs) == 9  # every conv of resnet8
    for match, conv, prior in zip(
        [m for m in module.matching if m.penalised], module.prior_convs, module.priors.buffers()
    ):
        assert match.teachers == (match.student,)
        w_t = teacher[f"{match.student}.weight"]
        factor = conv.weight.std(correction=0) / w_t.std(correction=0)  # student untouched: its initial std
        assert torch.allclose(prior, w_t * factor, atol=1e-6, rtol=1e-5)
    torch.manual_seed(0)
    started = KR(student="resnet8", teacher="resnet8", teacher_weights=str(teacher_path), **DIGITS)
    for conv, prior in zip(started.prior_convs, started.priors.buffers()):
        assert torch.equal(conv.weight, prior)


def test_random_prior_and_stage_level_build_other_priors(tmp_path):
    teacher_path = save_random(tmp_path, "resnet20", seed=1, num_classes=10, in_chans=1)
    priors = {}
    for kwargs in ({}, {"prior": "random"}, {"level": "stage"}):
        torch.manual_seed(0)
        module = KR(student="resnet8", teacher="resnet20", teacher_weights=str(teacher_path), **DIGITS, **kwargs)
        priors[str(kwargs)] = dict(module.priors.named_buffers())
        density = sum(int(m.sum()) for m in module.prior_masks.buffers()) / sum(
            m.numel() for m in module.prior_masks.buffers()
        )
        assert density == pytest.approx(0.1, abs=1e-3)
    base = priors["{}"]
    for other in list(priors.values())[1:]:
        assert base.keys() == other.keys()
        assert not torch.allclose(base["layer1__0__conv1"], other["layer1__0__conv1"])
    assert torch.allclose(base["conv1"], priors["{'level': 'stage'}"]["conv1"])  # a lone stem conv


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rho": 0.0}, "rho=0.0"),
        ({"beta": -1.0}, "beta=-1.0"),
        ({"level": "block"}, "level='block'"),
        ({"layers": ["stage9/*"]}, "pattern 'stage9/\\*' selects no student conv"),
    ],
)
def test_bad_config_fails_at_construction_naming_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KR(student="resnet8", teacher="resnet8", **DIGITS, **kwargs)


def test_layer_patterns_select_penalised_convs():
    module = KR(student="resnet8", teacher="resnet20", layers=["stage3/*", "stem/*"], **DIGITS)
    assert [m.student for m in module.matching if m.penalised] == [
        "conv1",
        "layer3.0.conv1",
        "layer3.0.conv2",
        "layer3.0.downsample.0",
    ]


@pytest.mark.slow
# ---- through the CLI ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ablation, attribute, value",
    [
        ("random_prior", "prior", "random"),
        ("dense_mask", "rho", 1.0),
        ("stage_level", "level", "stage"),
        ("no_prior_init", "init_from_prior", False),
        ("remask", "remask_every_epoch", True),
        ("kmeans", "grouping", "kmeans"),
    ],
)
def test_ablation_files_compose_after_the_method_file(in_tmp, ablation, attribute, value):
    cli = build_cli(
        [
            "--config",
            str(CONFIGS / "digits/pair.yaml"),
            "--config",
            str(CONFIGS / "kr/kr.yaml"),
            "--config",
            str(CONFIGS / f"kr/ablations/{ablation}.yaml"),
            "--model.init_args.teacher_weights=null",
            *FAST,
        ],
        run=False,
    )
    assert isinstance(cli.model, KR) and cli.model.hparams[attribute] == value
    assert cli.model.hparams.beta == 1e-3 and cli.model.hparams.student == "resnet8"


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=2, per_class_test=1)


@pytest.mark.slow
def test_cross_family_example_composes_with_its_pair(in_tmp, fake_cifar):
    cli = build_cli(
        [
            "--config",
            str(CONFIGS / "cifar100/pairs/vgg13_MobileNetV2.yaml"),
            "--config",
            str(CONFIGS / "kr/vgg13_MobileNetV2.yaml"),
            "--model.init_args.teacher_weights=null",
            f"--data.init_args.data_dir={fake_cifar}",
            *FAST,
        ],
        run=False,
    )
    penalised = [m for m in cli.model.matching if m.penalised]
    assert cli.model.hparams.lr == 0.01 and len(cli.model.terms) == 1
    assert any(m.student_shape[2:] == (1, 1) for m in penalised) and any(m.student_shape[1] == 1 for m in penalised)


@pytest.mark.slow
def test_kr_kd_runs_through_cli_on_fake_cifar(in_tmp, fake_cifar, caplog):
    teacher = save_random(in_tmp, "resnet56", seed=0)
    with caplog.at_level(logging.INFO):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "cifar100/pairs/resnet56_resnet20.yaml"),
                "--config",
                str(CONFIGS / "kr/kr_kd.yaml"),
                f"--model.init_args.teacher_weights={teacher}",
                f"--data.init_args.data_dir={fake_cifar}",
                "--data.init_args.verify_md5=false",
                "--data.init_args.batch_size=16",
                "--data.init_args.num_workers=0",
                "--trainer.max_epochs=1",
                *FAST,
            ]
        )
    assert "KR layer matching (resnet56 -> resnet20)" in caplog.text and "layer3.8.conv2" in caplog.text
    run = in_tmp / "runs/cifar100/kr/resnet56-resnet20/version_0"
    logged = {k for r in read_metrics(run) for k in r}
    assert {
        "train/loss_ce_step",
        "train/loss_kd_step",
        "train/loss_kr_step",
        "train/kr_mask_density",
        "train/kr_distance",
        "train/kr_distance_masked",
        "val/top1",
    } <= logged
    state = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert "priors.layer1__0__conv1" in state and "prior_masks.layer3__2__conv2" in state
    assert not any(k.startswith("teacher") for k in state)
    moved = state["student.layer1.0.conv1.weight"] - state["priors.layer1__0__conv1"]
    assert moved.abs().max() > 0  # the student started at its prior and trained away from it


def fit_digits(teacher: Path, epochs: int, *extra: str):
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits/pair.yaml"),
            "--config",
            str(CONFIGS / "digits/kr.yaml"),
            f"--model.init_args.teacher_weights={teacher}",
            "--model.init_args.remask_every_epoch=true",
            f"--trainer.max_epochs={epochs}",
            *FAST,
            *extra,
        ]
    )


@pytest.mark.slow
def test_resumed_kr_run_equals_uninterrupted(in_tmp):
    teacher = save_random(in_tmp, "resnet20", seed=0, num_classes=10, in_chans=1)
    fit_digits(teacher, 2, "--trainer.logger.init_args.name=straight")
    fit_digits(teacher, 1, "--trainer.logger.init_args.name=split")
    first = in_tmp / "runs/split/version_0/checkpoints/last.ckpt"
    after_one = torch.load(first, weights_only=True)["state_dict"]
    fit_digits(teacher, 2, f"--ckpt_path={first}")
    straight = torch.load(in_tmp / "runs/straight/version_0/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    resumed = torch.load(first, weights_only=True)["state_dict"]
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    key = "prior_masks.layer3__0__conv2"
    assert not torch.equal(after_one[key], resumed[key])  # the second epoch re-masked from |W_S − W_D|


@pytest.mark.ddp
def test_two_process_ddp_keeps_ranks_and_priors_identical(in_tmp):
    teacher = save_random(in_tmp, "resnet20", seed=0, num_classes=10, in_chans=1)
    args = [
        "fit",
        "--config",
        str(CONFIGS / "digits/pair.yaml"),
        "--config",
        str(CONFIGS / "digits/kr.yaml"),
        f"--model.init_args.teacher_weights={teacher}",
        "--trainer.max_epochs=1",
        *FAST,
        "--seed_everything=false",  # each rank draws its own student init: rank 0's priors must win
        "--trainer.limit_train_batches=3",
    ]
    rank0, rank1 = run_two_ranks(args, in_tmp)
    assert "priors.conv1" in rank0
    assert_same_tensors(rank0, rank1)
