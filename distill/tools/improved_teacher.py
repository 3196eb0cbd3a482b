"""Export SOKD's improved teacher (Liu, Liu, Huang, BMVC 2021) as a plain state_dict.

The improved teacher (:func:`distill.methods.sokd.improved_teacher_state_dict`) is an ordinary
state_dict of the teacher architecture: ``load_weights`` reads it and every method accepts it as
``teacher_weights``. ``distill export --network teacher-improved`` writes it in every format::

    python -m distill.tools.improved_teacher runs/.../checkpoints/last.ckpt improved_teacher.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..methods.sokd import improved_teacher_state_dict


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
