"""Export a trained network from any method's checkpoint for use outside ``distill``.

    distill export runs/.../checkpoints/last.ckpt [--out DIR] [--network student|peer|teacher-improved]
                   [--width W] [--formats pt safetensors torchscript onnx] [--arch NAME]

Writes ``<arch>.pt`` (a plain state_dict with the classic key names), ``<arch>.safetensors``,
``<arch>.torchscript.pt`` (traced) and ``<arch>.onnx`` (batch axis dynamic), plus ``<arch>.json``
(architecture, classes, input shape, width, source checkpoint and its SHA-256). The architecture and
its shape come from the checkpoint's ``hyper_parameters`` (``student`` or ``model``, ``num_classes``,
``in_chans``, ``image_size``); ``--arch`` and friends are needed only for a plain state_dict.

Networks: ``student`` is the method's trained network (``student.`` or, for ``Supervised``,
``model.``); ``peer`` DML's second network; ``teacher-improved`` SOKD's improved teacher
(:mod:`distill.tools.improved_teacher`). A slimmable network (a PWKD teacher trained by
``SlimmableSupervised``) exports at ``--width`` (default 1.0): TorchScript and ONNX run at that
width; at width 1.0 the state_dict is the ordinary architecture's, at a narrower one it is the whole
slimmable state_dict (load it with ``distill.models.slimmable.load_slimmable``, then ``set_width``).
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..finite import NonFiniteError, nonfinite_tensors, nonfinite_weights_message
from ..methods.card import Network, method_class
from ..models import create_model, read_state_dict
from ..models.slimmable import checkpoint_widths, make_slimmable, set_width
from ..models.weights import WeightLoadError, file_sha256, load_checkpoint

FORMATS = ("pt", "safetensors", "torchscript", "onnx")
SUFFIXES = {"pt": ".pt", "safetensors": ".safetensors", "torchscript": ".torchscript.pt", "onnx": ".onnx"}


@dataclass
class ExportedNetwork:
    """A network read from a checkpoint, in eval mode, with what is needed to rebuild it."""

    model: nn.Module
    arch: str
    num_classes: int
    in_chans: int
    image_size: int
    width: float | None  # set for a slimmable network
    source: Path

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        if self.width == 1.0:  # the whole width of a slimmable network is the ordinary one
            state = {k: v for k, v in state.items() if ".per_width." not in f".{k}"}
        return state

    def example(self) -> torch.Tensor:
        """The fixed input used for tracing and for checking exports (seeded)."""
        generator = torch.Generator().manual_seed(0)
        return torch.randn(2, self.in_chans, self.image_size, self.image_size, generator=generator)

    def metadata(self, network: str) -> dict:
        return {
            "arch": self.arch,
            "network": network,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "image_size": self.image_size,
            "width": self.width,
            "source": str(self.source),
            "source_sha256": file_sha256(self.source),
        }


def _hparam(hparams: dict, override, key: str, path: Path):
    value = override if override is not None else hparams.get(key)
    if value is None:
        raise KeyError(f"{path}: no hyper_parameters[{key!r}] (a plain state_dict?); pass --{key.replace('_', '-')}")
    return value


def checkpoint_networks(hparams: dict) -> dict[str, Network]:
    """The networks a method checkpoint holds, as its method class declares them (``exported``); for a
    checkpoint written outside the CLI (no ``_class_path``), the trained network under ``student.`` or
    ``model.``."""
    if "_class_path" in hparams:
        return method_class(hparams["_class_path"]).exported
    arch_arg = "student" if "student" in hparams else "model"
    return {"student": Network(f"{arch_arg}.", arch_arg, f"{arch_arg}_kwargs")}


def load_network(
    checkpoint: str | Path,
    network: str = "student",
    width: float | None = None,
    arch: str | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    image_size: int | None = None,
) -> ExportedNetwork:
    """Rebuild ``network`` of ``checkpoint`` (a method's ``.ckpt`` or a plain state_dict)."""
    path = Path(checkpoint)
    state = read_state_dict(path)  # readable, so safe to load again below
    ckpt = load_checkpoint(path)
    hparams = (ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None) or {}
    kwargs = {}
    if hparams:
        networks = checkpoint_networks(hparams)
        if network not in networks:
            raise ValueError(
                f"{path}: --network {network!r} is not a network of this checkpoint's method; it has "
                + ", ".join(networks)
            )
        spec = networks[network]
        state = spec.assemble(path) if spec.assemble else read_state_dict(path, prefix=spec.prefix)
        arch = arch or hparams.get(spec.arch_arg)
        kwargs = hparams.get(spec.kwargs_arg) or {}
    elif network != "student":
        raise ValueError(f"{path}: a plain state_dict holds one network; --network {network!r} needs a run's .ckpt")
    if not arch:
        raise KeyError(f"{path}: no architecture in hyper_parameters; pass --arch")
    shape = {
        "num_classes": _hparam(hparams, num_classes, "num_classes", path),
        "in_chans": _hparam(hparams, in_chans, "in_chans", path),
        "image_size": _hparam(hparams, image_size, "image_size", path),
    }
    model = create_model(arch, num_classes=shape["num_classes"], in_chans=shape["in_chans"], **kwargs)
    widths = checkpoint_widths(state)
    if widths != (1.0,):
        make_slimmable(model, widths, shape["image_size"])
    elif width is not None:
        raise ValueError(f"{path}: --width {width} needs a slimmable network (a SlimmableSupervised checkpoint)")
    bad = nonfinite_tensors(state)
    if bad:
        raise NonFiniteError(nonfinite_weights_message(f"{path}: the {network}", bad))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise WeightLoadError(f"{path}: the {network} weights do not fit {arch}: {err}") from err
    if widths != (1.0,):
        width = 1.0 if width is None else width
        set_width(model, width)
    return ExportedNetwork(model.eval(), arch, width=width, source=path, **shape)


def export(
    net: ExportedNetwork, out: str | Path, formats=FORMATS, network: str = "student", name: str | None = None
) -> dict[str, Path]:
    """Write ``net`` in every format of ``formats`` to ``out``; return ``{format: path}``."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}; expected some of {', '.join(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = name or (net.arch if net.width in (None, 1.0) else f"{net.arch}_w{net.width:g}")
    paths = {fmt: out / f"{stem}{SUFFIXES[fmt]}" for fmt in formats}
    metadata = net.metadata(network)
    if "pt" in paths:
        torch.save(net.state_dict(), paths["pt"])
    if "safetensors" in paths:
        from safetensors.torch import save

        tensors = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
        header = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in metadata.items()}
        # written by Python, not by safetensors' save_file (mode 0600): the umask applies as to the other files
        paths["safetensors"].write_bytes(save(tensors, metadata=header))
    example = net.example()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript and the TorchScript-based ONNX exporter
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # forward's `if not features` is a constant
        if "torchscript" in paths:
            torch.jit.save(torch.jit.trace(net.model, example), str(paths["torchscript"]))
        if "onnx" in paths:  # the TorchScript-based exporter: the dynamo one needs onnxscript
            torch.onnx.export(
                net.model,
                (example,),
                str(paths["onnx"]),
                dynamo=False,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            )
    info = out / f"{stem}.json"
    info.write_text(json.dumps({**metadata, "files": {k: p.name for k, p in paths.items()}}, indent=2) + "\n")
    return {**paths, "json": info}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="distill export",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a trained network from any method's checkpoint: a plain state_dict (.pt) with the\n"
        "classic key names, .safetensors, TorchScript (traced) and ONNX (dynamic batch), and a .json with\n"
        "the architecture, the input shape and the source checkpoint's SHA-256.",
        epilog="example:\n  distill export runs/<name>/version_<n>/checkpoints/last.ckpt --out export/ --formats onnx",
    )
    parser.add_argument("checkpoint", help="a run's .ckpt (any method), or a plain state_dict (then give --arch)")
    parser.add_argument("--out", default="export", help="output directory (default: export/)")
    parser.add_argument(
        "--network",
        default="student",
        help="which network: the method's trained one (student, the default; a Supervised run's model), DML's "
        "peer, or SOKD's improved teacher (teacher-improved); the error lists a checkpoint's networks",
    )
    parser.add_argument(
        "--width",
        type=float,
        help="width of a slimmable network (a PWKD teacher trained by SlimmableSupervised); default 1.0",
    )
    parser.add_argument(
        "--formats",
        nargs="+",
        choices=FORMATS,
        default=list(FORMATS),
        help=f"formats to write (default: all of {' '.join(FORMATS)})",
    )
    parser.add_argument("--name", help="file name stem (default: the architecture, with _w<width> when narrower)")
    parser.add_argument("--arch", help="architecture, for a checkpoint without hyper_parameters (a plain state_dict)")
    parser.add_argument("--num-classes", type=int, help="classes, for a checkpoint without hyper_parameters")
    parser.add_argument("--in-chans", type=int, help="input channels, for a checkpoint without hyper_parameters")
    parser.add_argument("--image-size", type=int, help="input side used to trace and check (default: the run's)")
    args = parser.parse_args(argv)
    try:
        net = load_network(
            args.checkpoint, args.network, args.width, args.arch, args.num_classes, args.in_chans, args.image_size
        )
    except NonFiniteError as error:
        raise SystemExit(f"distill export: {error}") from None
    for path in export(net, args.out, args.formats, args.network, args.name).values():
        print(path)


if __name__ == "__main__":
    main()
