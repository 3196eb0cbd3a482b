"""``distill export``: every format reproduces the checkpoint-loaded network's outputs."""

import json

import numpy as np
import onnx
import pytest
import torch
from helpers import CONFIGS, FAST
from onnx.reference import ReferenceEvaluator
from safetensors.torch import load_file

from distill.cli import main
from distill.models import create_model, load_weights
from distill.models.slimmable import load_slimmable, make_slimmable, set_width
from distill.tools.export import export, load_network
from distill.tools.improved_teacher import improved_teacher_state_dict

DIGITS = {"num_classes": 10, "in_chans": 1}
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-epoch digits checkpoints: a KD student, a SOKD run and a slimmable (PWKD) teacher."""
    root = tmp_path_factory.mktemp("export_runs")
    torch.manual_seed(0)
    teacher = root / "teacher.pt"
    torch.save(create_model("resnet20", **DIGITS).state_dict(), teacher)
    jobs = {
        "kd": ["pair.yaml", "../methods/kd.yaml"],
        "sokd": ["pair.yaml", "sokd.yaml"],
        "slimmable": ["pwkd_teacher.yaml"],
    }
    for name, configs in jobs.items():
        args = ["fit", *(a for c in configs for a in ("--config", str(CONFIGS / "digits" / c)))]
        if name != "slimmable":
            args.append(f"--model.init_args.teacher_weights={teacher}")
        main(
            [
                *args,
                "--trainer.max_epochs=1",
                *FAST,
                f"--trainer.logger.init_args.save_dir={root}",
                f"--trainer.logger.init_args.name={name}",
            ]
        )
    return {name: root / name / "version_0/checkpoints/last.ckpt" for name in jobs}


def exported_outputs(paths: dict, reference: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits of each exported file on ``x``; the state_dicts go into a fresh copy of ``reference``."""
    outputs = {}
    with torch.no_grad():
        for fmt in ("pt", "safetensors"):
            model = reference()
            model.load_state_dict(torch.load(paths[fmt], weights_only=True) if fmt == "pt" else load_file(paths[fmt]))
            outputs[fmt] = model.eval()(x)
        outputs["torchscript"] = torch.jit.load(str(paths["torchscript"]))(x)
    session = ReferenceEvaluator(onnx.load(str(paths["onnx"])))
    outputs["onnx"] = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    return outputs


def check_all_formats(net, expected_model, fresh, tmp_path, **kwargs):
    paths = export(net, tmp_path, **kwargs)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))  # not the tracing batch size
    with torch.no_grad():
        expected = expected_model.eval()(x)
    for fmt, out in exported_outputs(paths, fresh, x).items():
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5, msg=lambda m, fmt=fmt: f"{fmt}: {m}")
    return paths


@pytest.mark.slow
def test_student_of_a_kd_checkpoint_in_every_format(runs, tmp_path):
    net = load_network(runs["kd"])
    assert (net.arch, net.num_classes, net.in_chans, net.image_size) == ("resnet8", 10, 1, 16)
    expected = load_weights(create_model("resnet8", **DIGITS), runs["kd"])  # picks the student. keys
    paths = check_all_formats(net, expected, lambda: create_model("resnet8", **DIGITS), tmp_path)
    info = json.loads(paths["json"].read_text())
    assert info["arch"] == "resnet8" and info["network"] == "student" and info["source"] == str(runs["kd"])


@pytest.mark.slow
def test_sokd_improved_teacher(runs, tmp_path):
    net = load_network(runs["sokd"], network="teacher-improved")
    assert net.arch == "resnet20"
    expected = create_model("resnet20", **DIGITS)
    expected.load_state_dict(improved_teacher_state_dict(runs["sokd"]))
    check_all_formats(net, expected, lambda: create_model("resnet20", **DIGITS), tmp_path, network="teacher-improved")


@pytest.mark.slow
def test_slimmable_teacher_at_a_width(runs, tmp_path):
    def slimmable(width: float, trained: bool = True):
        model = create_model("resnet20", **DIGITS)
        if trained:
            load_slimmable(model, runs["slimmable"], image_size=16)
        else:
            make_slimmable(model, (0.25, 0.5, 0.75, 1.0), image_size=16)
        set_width(model, width)
        return model

    net = load_network(runs["slimmable"], width=0.5)
    paths = check_all_formats(net, slimmable(0.5), lambda: slimmable(0.5, trained=False), tmp_path)
    assert paths["pt"].name == "resnet20_w0.5.pt"
    whole = load_network(runs["slimmable"])  # width 1.0: the ordinary architecture's state_dict
    ordinary = load_weights(create_model("resnet20", **DIGITS), export(whole, tmp_path / "whole", formats=["pt"])["pt"])
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ordinary.eval()(x), slimmable(1.0).eval()(x))


def test_plain_state_dict_needs_the_architecture(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(create_model("resnet8", **DIGITS).state_dict(), path)
    with pytest.raises(KeyError, match="--arch"):
        load_network(path)
    net = load_network(path, arch="resnet8", image_size=16, **DIGITS)
    with pytest.raises(ValueError, match="slimmable"):
        load_network(path, width=0.5, arch="resnet8", image_size=16, **DIGITS)
    assert net.arch == "resnet8"


def test_distill_export_subcommand(runs, tmp_path, capsys):
    main(["export", str(runs["kd"]), "--out", str(tmp_path), "--formats", "pt", "safetensors"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet8.json", "resnet8.pt", "resnet8.safetensors"]
    assert capsys.readouterr().out.splitlines()[0] == str(tmp_path / "resnet8.pt")
    assert np.allclose(
        load_file(tmp_path / "resnet8.safetensors")["fc.bias"].numpy(),
        torch.load(tmp_path / "resnet8.pt", weights_only=True)["fc.bias"].numpy(),
    )
