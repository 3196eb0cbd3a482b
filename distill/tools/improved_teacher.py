"""Export SOKD's improved teacher (Liu, Liu, Huang, BMVC 2021; METHODS.md §5) as a plain state_dict.

The improved teacher is the frozen teacher up to the bridge followed by the trained knowledge bridge
module. The export is an ordinary state_dict of the teacher architecture: the teacher's weights
(re-read from the file the run recorded, SHA-256 checked), its BatchNorm buffers as the checkpoint
saved them when the run used ``teacher_bn=train``, and the KBM's weights in place of the teacher's
last stages and head. ``load_weights`` reads it and every method accepts it as ``teacher_weights``::

    python -m distill.tools.improved_teacher runs/.../checkpoints/last.ckpt improved_teacher.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..methods.sokd import KBM_STATE_PREFIX
from ..models import create_model, read_state_dict
from ..models.weights import WeightLoadError, file_sha256, load_checkpoint


def improved_teacher_state_dict(
    checkpoint: str | Path, teacher_weights: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """The improved teacher of a SOKD checkpoint; ``teacher_weights`` overrides the recorded path."""
    ckpt = load_checkpoint(checkpoint)
    record, teacher = ckpt.get("distill_sokd"), ckpt.get("distill_teacher")
    if record is None or teacher is None:
        raise WeightLoadError(f"{checkpoint}: not a SOKD checkpoint (no 'distill_sokd' record)")
    weights = teacher_weights or teacher["weights"]
    if weights is None:
        raise WeightLoadError(f"{checkpoint}: the run had no teacher_weights, so there is no teacher to export")
    if file_sha256(weights) != teacher["sha256"]:
        raise WeightLoadError(
            f"{weights} is not the teacher {checkpoint} was trained with (sha256 {teacher['sha256']})"
        )
    state = read_state_dict(weights)
    state.update(record["teacher_buffers"] or {})
    state.update(
        {k[len(KBM_STATE_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(KBM_STATE_PREFIX)}
    )
    model = create_model(
        teacher["arch"], num_classes=record["num_classes"], in_chans=record["in_chans"], **record["teacher_kwargs"]
    )
    model.load_state_dict(state)  # strict: the export is exactly the teacher architecture
    return model.state_dict()


def export_improved_teacher(checkpoint: str | Path, out: str | Path, teacher_weights: str | Path | None = None) -> Path:
    """Write :func:`improved_teacher_state_dict` to ``out``; return ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(improved_teacher_state_dict(checkpoint, teacher_weights), out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a SOKD run's .ckpt")
    parser.add_argument("out", help="where to write the improved teacher's state_dict (.pt)")
    parser.add_argument("--teacher-weights", help="the teacher's weights, if they moved since training")
    args = parser.parse_args(argv)
    print(export_improved_teacher(args.checkpoint, args.out, args.teacher_weights))


if __name__ == "__main__":
    main()
