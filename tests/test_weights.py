import argparse
import copy
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from distill.methods import OfflineKD
from distill.methods.teacher import build_teacher
from distill.models import create_model
from distill.models.weights import WeightLoadError, file_sha256, load_weights, read_state_dict


class Tiny(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3)
        self.fc = nn.Linear(width, 10)


def test_lightning_checkpoint_prefixes_are_stripped(tmp_path):
    src = Tiny()
    path = tmp_path / "run.ckpt"
    state = {f"student.{k}": v for k, v in src.state_dict().items()}
    state["terms.0.regressor.weight"] = torch.zeros(1)  # a connector of a KD run is not the student's
    torch.save({"state_dict": state, "epoch": 3}, path)
    dst = load_weights(Tiny(), path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_ddp_and_compile_prefixes_are_stripped(tmp_path):
    src = Tiny()
    path = tmp_path / "w.pt"
    torch.save({f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}, path)
    assert torch.equal(load_weights(Tiny(), path).fc.weight, src.fc.weight)


def test_mismatches_are_named(tmp_path):
    path = tmp_path / "w.pt"
    state = Tiny(width=8).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    torch.save(state, path)
    with pytest.raises(WeightLoadError) as err:
        load_weights(Tiny(), path)
    message = str(err.value)
    assert "missing keys (1): fc.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "conv1.weight: checkpoint (8, 3, 3, 3) vs model (4, 3, 3, 3)" in message


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"fc.weight": Payload()}, handle)
    with pytest.raises(WeightLoadError, match="refused to load"):
        read_state_dict(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_state_dict(tmp_path / "nope.pt")


# ---- peer checkpoint formats (each written from one of our own models, as the peer's code saves it) ----


def _trained_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """SGD after one step, so its state holds momentum buffers as the peers' checkpoints do."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    return optimizer


def _peer_checkpoint(fmt: str, model: nn.Module) -> dict:
    state = model.state_dict()
    optimizer = _trained_optimizer(copy.deepcopy(model))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[150, 180, 210], gamma=0.1)
    opt = argparse.Namespace(model="resnet8", learning_rate=0.05, lr_decay_epochs=[150, 180, 210], trial="0")
    other = {k: torch.zeros_like(v) for k, v in state.items()}
    return {
        # RepDistiller train_teacher.py: ckpt_epoch_<n>.pth, <model>_best.pth, <model>_last.pth
        "crd_epoch": {
            "epoch": 240,
            "model": state,
            "accuracy": torch.tensor(72.5),
            "optimizer": optimizer.state_dict(),
        },
        "crd_best": {"epoch": 231, "model": state, "best_acc": torch.tensor(73.1), "optimizer": optimizer.state_dict()},
        "crd_last": {"opt": opt, "model": state, "optimizer": optimizer.state_dict()},
        # mdistiller trainer: student_best, and best/latest holding the DataParallel-wrapped distiller
        "mdistiller_student": {"model": state},
        "mdistiller_distiller": {
            "epoch": 240,
            "model": {
                **{f"module.student.{k}": v for k, v in state.items()},
                **{f"module.teacher.{k}": v for k, v in other.items()},
            },
            "optimizer": optimizer.state_dict(),
            "best_acc": torch.tensor(71.0),
        },
        # torchdistill main_util.save_ckpt
        "torchdistill": {
            "model": state,
            "optimizer": optimizer.state_dict(),
            "best_value": 0.725,
            "lr_scheduler": scheduler.state_dict(),
            "args": argparse.Namespace(config="configs/kd.yaml", device="cuda", log=None, seed=None),
        },
        # community CIFAR training scripts (pytorch-cifar style): DataParallel-wrapped, under "net"
        "community": {"net": {f"module.{k}": v for k, v in state.items()}, "acc": 93.02, "epoch": 199},
    }[fmt]


@pytest.mark.parametrize(
    "fmt",
    ["crd_epoch", "crd_best", "crd_last", "mdistiller_student", "mdistiller_distiller", "torchdistill", "community"],
)
def test_peer_checkpoints_load_as_teachers(tmp_path, fmt):
    torch.manual_seed(0)
    source = create_model("resnet8", num_classes=10)
    path = tmp_path / f"{fmt}.pth"
    torch.save(_peer_checkpoint(fmt, source), path)
    teacher, info = build_teacher("resnet8", str(path), num_classes=10, in_chans=3)
    for key, value in source.state_dict().items():
        assert torch.equal(teacher.state_dict()[key], value), key
    assert info["sha256"] == file_sha256(path)


def test_a_peer_checkpoint_pickling_another_class_is_refused_naming_it(tmp_path):
    path = tmp_path / "last.pth"
    state = create_model("resnet8", num_classes=10).state_dict()
    torch.save({"model": state, "args": argparse.Namespace(output_dir=Path("/runs"))}, path)
    with pytest.raises(WeightLoadError, match=r"last.pth: refused to load \(it pickles pathlib\.\w*Path, which"):
        read_state_dict(path)


# ---- pretrained weights by name, from a temporary local cache (never the network) ----------------


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch-hub and Hugging Face caches under tmp_path; the network is off."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_torchvision_weights_by_name_from_the_torch_hub_cache(caches):
    name = "torchvision:MobileNet_V2_Weights.IMAGENET1K_V1"
    with pytest.raises(FileNotFoundError) as missing:
        build_teacher("mobilenet_v2", name, num_classes=1000, in_chans=3)
    folder = caches / "torch/hub/checkpoints"
    assert "put mobilenet_v2-b0353104.pth (from https://" in str(missing.value)
    assert f"into {folder}" in str(missing.value)
    torch.manual_seed(0)
    source = create_model("mobilenet_v2", num_classes=1000)
    folder.mkdir(parents=True)
    torch.save(source.state_dict(), folder / "mobilenet_v2-b0353104.pth")
    teacher, info = build_teacher("mobilenet_v2", name, num_classes=1000, in_chans=3)
    assert torch.equal(teacher.classifier[1].weight, source.classifier[1].weight)
    file = folder / "mobilenet_v2-b0353104.pth"
    assert info == {"arch": "mobilenet_v2", "weights": str(file), "sha256": file_sha256(file), "name": name}
    with pytest.raises(ValueError, match="ResNet34_Weights.IMAGENET1K_V1 are not weights of mobilenet_v2"):
        build_teacher("mobilenet_v2", "torchvision:ResNet34_Weights.IMAGENET1K_V1", num_classes=1000, in_chans=3)


def _cache_timm_weights(caches: Path, seed: int) -> tuple[nn.Module, Path]:
    """Our own timm/test_resnet's weights where the hub cache keeps timm/test_resnet.r160_in1k."""
    torch.manual_seed(seed)
    source = create_model("timm/test_resnet", num_classes=5, in_chans=3)
    file = caches / "hf/hub/models--timm--test_resnet.r160_in1k/snapshots/main/model.safetensors"
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(source.state_dict(), file)
    return source, file


def test_timm_weights_by_name_from_the_hugging_face_cache(caches):
    with pytest.raises(FileNotFoundError) as missing:
        build_teacher("timm/test_resnet", "timm:test_resnet", num_classes=5, in_chans=3)
    folder = caches / "hf/hub/models--timm--test_resnet.r160_in1k/snapshots/main"
    assert f"put model.safetensors into {folder}" in str(missing.value)
    source, file = _cache_timm_weights(caches, seed=0)
    for name in ("timm:test_resnet", "timm:test_resnet.r160_in1k"):  # the default tag, then explicit
        teacher, info = build_teacher("timm/test_resnet", name, num_classes=5, in_chans=3)
        for key, value in source.state_dict().items():
            assert torch.equal(teacher.state_dict()[key], value), key
        assert info == {"arch": "timm/test_resnet", "weights": str(file), "sha256": file_sha256(file), "name": name}
    with pytest.raises(ValueError, match="are weights of timm/test_resnet, not of the teacher timm/test_vit"):
        build_teacher("timm/test_vit", "timm:test_resnet.r160_in1k", num_classes=5, in_chans=3)


def test_resuming_with_other_weights_under_the_same_name_is_refused(caches):
    _cache_timm_weights(caches, seed=0)
    kwargs = {"student": "timm/test_resnet", "teacher": "timm/test_resnet", "teacher_weights": "timm:test_resnet"}
    checkpoint = {}
    OfflineKD(**kwargs, num_classes=5).on_save_checkpoint(checkpoint)
    assert checkpoint["distill_teacher"]["name"] == "timm:test_resnet"
    _cache_timm_weights(caches, seed=1)  # the cache now holds other weights under the same name
    with pytest.raises(ValueError, match="teacher weights differ"):
        OfflineKD(**kwargs, num_classes=5).on_load_checkpoint(checkpoint)
