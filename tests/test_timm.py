"""timm models behind the staged interface: outputs from timm's feature API, timm's parameter names,
runnable views where they exist, refusals with a reason, KD/FitNet/PWKD with timm networks."""

import copy

import pytest
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
import yaml
from fakedata import write_fake_image_folder
from helpers import CONFIGS

from distill.cli import main
from distill.data.imagenet import ImageNetDataModule
from distill.losses import FitNetTerm, KDTerm, SPTerm
from distill.methods import OfflineKD
from distill.methods.base import refuse_lossy_sync_batchnorm
from distill.methods.sokd import SOKD
from distill.methods.sskd import SSKD, student_parts
from distill.models import create_model, load_weights
from distill.models.slimmable import make_slimmable, set_width
from distill.models.timm_models import TimmNet

TIMM_PAIRS = sorted((CONFIGS / "imagenet/pairs").glob("timm_*.yaml"))


def vit(**kwargs):
    """timm's 6-block test ViT (patch 16, one class token) on 32-pixel images: a 2x2 patch grid."""
    return create_model("timm/test_vit", num_classes=5, in_chans=3, img_size=32, **kwargs)


def test_timm_cnn_serves_every_output_of_its_children():
    torch.manual_seed(0)
    net = create_model("timm/test_resnet", num_classes=5, in_chans=3).eval()
    m = net.timm_model
    x = torch.randn(2, 3, 64, 64)
    out = net(x, features=True)
    with torch.no_grad():  # by hand, from timm's own children
        h = m.maxpool(m.act1(m.bn1(m.conv1(x))))
        stages = []
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            h = layer(h)
            stages.append(h)
        embedding = h.mean((2, 3))
        logits = m.fc(embedding)
    assert [tuple(s.shape[1:]) for s in out.stages] == [(32, 16, 16), (48, 8, 8), (192, 4, 4), (96, 2, 2)]
    for got, want in zip(out.stages, stages):
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(out.feature, stages[-1])
    assert torch.allclose(out.embedding, embedding, atol=1e-6)
    assert torch.allclose(out.logits, logits, atol=1e-6)
    assert torch.allclose(net(x), logits, atol=1e-6)
    assert net.unavailable_outputs().keys() == {"preacts", "preact_bn"}  # every other output is served


def test_timm_names_are_kept_and_timm_checkpoints_load_strictly(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=5)
    path = tmp_path / "timm.pth"
    torch.save(source.state_dict(), path)
    net = create_model("timm/test_resnet", num_classes=5, in_chans=3)
    assert list(net.state_dict()) == list(source.state_dict())
    load_weights(net, path)  # strict
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(net.eval()(x), source.eval()(x))
    net.layer1[0].conv1.weight.data.zero_()  # one module table: the network timm runs is this one
    assert torch.equal(net.timm_model.layer1[0].conv1.weight, torch.zeros_like(net.layer1[0].conv1.weight))
    net.double()  # dtype and device moves reach timm's network through the shared tables
    assert net.timm_model.bn1.running_mean.dtype == torch.float64
    assert net(x.double()).dtype == torch.float64
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # a module swap reaches timm's network and the views
    assert isinstance(net.timm_model.bn1, torch.nn.SyncBatchNorm)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in net.stem)


@pytest.mark.parametrize("name", ["timm/test_efficientnet", "timm/test_convnext"])
def test_views_replay_the_network(name):
    """Stem, stages and head run one by one give forward(features=True)'s outputs (EfficientNet's head
    ``pre`` is its 1x1 conv + BN, ConvNeXt's head norms after pooling)."""
    net = create_model(name, num_classes=5, in_chans=3).eval()
    x = torch.randn(2, 3, 64, 64)
    out = net(x, features=True)
    h = net.stem(x)
    for stage, want in zip(net.stages, out.stages):
        h = stage(h)
        assert torch.equal(h, want)
    feature, embedding = net.head.features(h)
    assert torch.equal(feature, out.feature) and torch.equal(embedding, out.embedding)
    assert torch.allclose(net.head.classifier(embedding), out.logits, atol=1e-6)


def test_timm_vit_serves_patch_token_maps():
    torch.manual_seed(0)
    net = vit().eval()
    m = net.timm_model
    x = torch.randn(2, 3, 32, 32)
    out = net(x, features=True)
    with torch.no_grad():  # by hand: one class token, then a 2x2 grid of patch tokens per block
        tokens = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        maps = []
        for block in m.blocks:
            tokens = block(tokens)
            maps.append(tokens[:, 1:].reshape(2, 2, 2, -1).permute(0, 3, 1, 2))
        normed = m.norm(tokens)
    assert len(out.stages) == len(m.blocks) == 6
    for got, want in zip(out.stages, maps):
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(out.feature, normed[:, 1:].reshape(2, 2, 2, -1).permute(0, 3, 1, 2), atol=1e-6)
    assert torch.allclose(out.embedding, normed[:, 0], atol=1e-6)  # class-token pooling
    assert torch.allclose(out.logits, m.head(normed[:, 0]), atol=1e-6)


def test_a_vit_cannot_run_stage_by_stage_and_methods_that_need_it_refuse_it():
    with pytest.raises(ValueError, match=r"timm/test_vit cannot be run stage by stage \(it runs on token sequences"):
        vit().runnable_views()
    with pytest.raises(ValueError, match="timm/test_vit cannot be run stage by stage"):
        SOKD(student="timm/test_resnet", teacher="timm/test_vit", teacher_kwargs={"img_size": 32}, num_classes=5)


def test_a_term_reading_an_output_a_network_cannot_give_is_refused_when_the_method_is_built(monkeypatch):
    """(No small timm model lacks an output, so one is made to: e.g. merged tokens that are no map.)"""
    monkeypatch.setattr(TimmNet, "unavailable_outputs", lambda self: {"feature": "forward_features merges tokens"})
    OfflineKD(student="resnet8", teacher="timm/test_resnet", terms=[KDTerm(), FitNetTerm()], num_classes=5)
    with pytest.raises(
        ValueError, match="^SPTerm reads the teacher's feature, which timm/test_resnet cannot give: forward_features"
    ):
        OfflineKD(student="resnet8", teacher="timm/test_resnet", terms=[KDTerm(), SPTerm()], num_classes=5)


def test_sskd_runs_a_timm_student_part_by_part_as_a_whole_and_refuses_a_vit():
    """ConvNeXt's head norms after pooling: SSKD's head part must run it, and train its parameters."""
    module = SSKD(student="timm/test_convnext", teacher="timm/test_resnet", num_classes=5, image_size=32)
    student = module.student.eval()
    x = torch.randn(2, 3, 32, 32)
    h = x
    parts = student_parts(student)
    for part in parts:
        h = part(h)
    assert torch.allclose(h, student(x), atol=1e-6)
    in_parts = [{id(p) for p in part.parameters()} for part in parts]
    assert set().union(*in_parts) == {id(p) for p in student.parameters()}
    assert {id(p) for p in student.timm_model.head.norm.parameters()} <= in_parts[-1]
    with pytest.raises(ValueError, match="timm/test_vit cannot be run stage by stage"):
        SSKD(student="timm/test_vit", student_kwargs={"img_size": 32}, teacher="resnet8", num_classes=5, image_size=32)


class FirstBatch(pl.Callback):
    """Records the first training batch and the student as it was before the first step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.images, self.targets = batch[0].clone(), batch[1].clone()
        self.student = copy.deepcopy(pl_module.student)


def test_kd_from_a_timm_vit_teacher_on_a_fake_imagenet_tree_one_step(tmp_path):
    root = write_fake_image_folder(tmp_path / "imagenet", num_classes=3, per_class_train=2, size=40)
    data = ImageNetDataModule(str(root), batch_size=6, num_workers=0, image_size=32, num_classes=3)
    torch.manual_seed(0)
    module = OfflineKD(
        student="timm/test_resnet",
        teacher="timm/test_vit",
        teacher_kwargs={"img_size": 32},
        terms=[KDTerm(weight=1.0, temperature=4.0)],
        num_classes=3,
        image_size=32,
        lr=0.1,
        weight_decay=0.0,
        momentum=0.0,
    )
    teacher_before = copy.deepcopy(module.teacher.state_dict())
    record = FirstBatch()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        log_every_n_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    # the logged KD term, re-derived in float64 from the recorded batch and the student before the step
    with torch.no_grad():
        z_t = module.teacher(record.images).double() / 4
        z_s = record.student.train()(record.images).double() / 4
    expected = 16 * (F.softmax(z_t, 1) * (F.log_softmax(z_t, 1) - F.log_softmax(z_s, 1))).sum(1).mean()
    assert trainer.callback_metrics["train/loss_kd_step"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert all(torch.equal(v, teacher_before[k]) for k, v in module.teacher.state_dict().items())
    for name in ("conv1.0.weight", "fc.weight"):  # (timm zero-initialises each block's last BN scale)
        assert not torch.equal(module.student.get_parameter(name), record.student.get_parameter(name)), name


def test_fitnet_with_a_timm_cnn_pair_trains_the_student_up_to_its_hint_stage():
    module = OfflineKD(
        student="timm/test_resnet",
        teacher="timm/test_efficientnet",
        terms=[FitNetTerm(weight=1.0)],
        ce_weight=0.0,
        num_classes=5,
        image_size=32,
    )
    assert module.terms[0].regressor.conv.out_channels == 48  # the teacher's middle stage (index 2)
    module.train()
    losses, _ = module.training_losses(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)), torch.arange(4))
    losses["fitnet"].backward()
    student = module.student
    reached = {name.split(".")[0] for name, p in student.named_parameters() if p.grad is not None}
    assert reached == {"conv1", "bn1", "layer1", "layer2", "layer3"}  # not layer4, not fc
    assert all(p.grad is not None for p in module.terms.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())


def test_a_timm_resnet_becomes_slimmable_and_a_timm_efficientnet_is_refused():
    torch.manual_seed(0)
    net = create_model("timm/test_resnet", num_classes=5, in_chans=3).eval()
    x = torch.randn(2, 3, 32, 32)
    whole = net(x)
    make_slimmable(net, widths=(0.5, 1.0), image_size=32)
    assert torch.equal(net(x), whole)  # the whole width is the ordinary network
    set_width(net, 0.5)
    half = net(x, features=True)
    assert half.logits.shape == (2, 5)
    assert [s.shape[1] for s in half.stages] == [16, 24, 96, 48]
    with pytest.raises(ValueError, match=r"cannot make 'bn1' \(BatchNormAct2d\) slimmable"):
        make_slimmable(create_model("timm/test_efficientnet", num_classes=5), widths=(0.5, 1.0), image_size=32)


def test_an_unknown_timm_model_is_named():
    with pytest.raises(KeyError, match=r"unknown timm model .resnet_nope. \(timm 1\."):
        create_model("timm/resnet_nope")


@pytest.mark.parametrize("pair", TIMM_PAIRS, ids=lambda p: p.stem)
def test_timm_pair_configs_parse(pair, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(pair), "--config", str(CONFIGS / "imagenet/kd.yaml"), "--print_config"])
    assert stop.value.code in (0, None)
    args = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert args["teacher"].startswith("timm/") and args["student"].startswith("timm/")
    assert args["teacher_weights"].startswith("timm:")
    assert len(TIMM_PAIRS) >= 2


def test_sync_batchnorm_that_would_drop_timms_fused_activation_is_refused():
    """torch's SyncBatchNorm conversion turns timm's BatchNormAct2d into a plain SyncBatchNorm without its
    activation; a method refuses that before the strategy converts anything."""
    net = create_model("timm/test_efficientnet", num_classes=10, in_chans=3)
    with pytest.raises(ValueError, match=r"replace student\.bn1 \(BatchNormAct2d, a BatchNorm with behaviour"):
        refuse_lossy_sync_batchnorm({"student": net})
    refuse_lossy_sync_batchnorm({"student": create_model("timm/test_resnet", num_classes=10, in_chans=3)})
