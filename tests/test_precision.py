"""Speed switches every method honours: bf16-mixed, channels_last and in-place torch.compile."""

import pytest
import torch
from helpers import CONFIGS, FAST

from distill.cli import main
from distill.errors import ConfigError
from distill.losses import KDTerm
from distill.methods import OfflineKD, SlimmableSupervised
from distill.models import create_model
from distill.tools.runs import read_metrics


@pytest.mark.slow
def test_bf16_channels_last_kd_fit_keeps_checkpoint_keys(in_tmp):
    torch.manual_seed(0)
    teacher = in_tmp / "teacher.pt"

    torch.save(create_model("resnet20", num_classes=10, in_chans=1).state_dict(), teacher)
    common = [
        "fit",
        "--config",
        str(CONFIGS / "digits/pair.yaml"),
        "--config",
        str(CONFIGS / "methods/kd.yaml"),
        f"--model.init_args.teacher_weights={teacher}",
        "--trainer.max_epochs=1",
        *FAST,
    ]
    main(common + ["--trainer.logger.init_args.name=plain"])
    main(
        common
        + [
            "--trainer.logger.init_args.name=fast",
            "--trainer.precision=bf16-mixed",
            "--model.init_args.channels_last=true",
        ]
    )
    plain = torch.load(in_tmp / "runs/plain/version_0/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    fast = torch.load(in_tmp / "runs/fast/version_0/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert plain.keys() == fast.keys()
    assert all(v.dtype == plain[k].dtype for k, v in fast.items())  # weights stay fp32 under mixed precision
    losses = [r["train/loss_step"] for r in read_metrics(in_tmp / "runs/fast/version_0") if "train/loss_step" in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow
def test_compile_is_in_place_and_keeps_keys():
    module = OfflineKD(
        student="resnet8",
        teacher="resnet20",
        terms=[KDTerm()],
        num_classes=10,
        in_chans=1,
        image_size=16,
        compile=True,
        channels_last=True,
    )
    keys = set(module.state_dict())
    module.configure_model()
    assert set(module.state_dict()) == keys
    assert not any("_orig_mod" in k for k in keys)
    assert module.student.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert module.teacher.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_on_the_cpu_refuses_a_network_under_eight_channels():
    """torch 2.14.1 aborts with heap corruption in the CPU backward of channels_last layers of 4 or 6
    channels: the slimmable resnet20's 0.25 width (4) is refused, naming the layer; its 0.5 width (8) runs."""
    common = {"model": "resnet20", "num_classes": 10, "in_chans": 1, "image_size": 16, "channels_last": True}
    narrow = SlimmableSupervised(widths=[0.25, 1.0], **common)
    with pytest.raises(ConfigError, match=r"^model\.init_args\.channels_last=true: model\.conv1 runs 4 channels"):
        narrow.configure_model()
    wide = SlimmableSupervised(widths=[0.5, 1.0], **common)
    wide.configure_model()
    assert wide.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
