"""Non-finite training fails loudly: the error it raises, and the check of a checkpoint's weights.

A diverged run (a loss term or the gradient norm NaN or infinite) stops with :class:`NonFiniteError`
naming the first bad step, the values that were not finite there and the run's last checkpoint
written before it; nothing after that step is validated or saved (``distill.methods.base``), and
``distill export`` refuses weights that are not finite.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError


class NonFiniteError(UserError, RuntimeError):
    """Training produced a NaN or an infinity (or a checkpoint holds one): the message names the step, the
    non-finite values and the last good checkpoint, and :func:`distill.cli.main` prints it as one line."""


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold a NaN or an infinity (one device read)."""
    names = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not names:
        return []
    finite = [torch.isfinite(state[k]).all() for k in names]
    finite = torch.stack([f.to(finite[0].device) for f in finite]).tolist()
    return [name for name, ok in zip(names, finite) if not ok]


def last_checkpoint(trainer) -> Path | None:
    """The newest checkpoint file this run wrote (or resumed from), if any."""
    paths = [getattr(trainer, "ckpt_path", None)]
    for callback in getattr(trainer, "checkpoint_callbacks", []):
        paths += [getattr(callback, "best_model_path", None), getattr(callback, "last_model_path", None)]
    files = {Path(p) for p in paths if p and Path(p).is_file()}
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None


def divergence_message(step: int, names: list[str], checkpoint: Path | None) -> str:
    """One line: where the run diverged, what was not finite, and what is left to resume from."""
    last = (
        f"the last checkpoint written before it is {checkpoint}"
        if checkpoint
        else "no checkpoint was written before it"
    )
    return (
        f"training diverged: {', '.join(names)} not finite at global step {step}; nothing after that step "
        f"is validated or saved, and {last}. Lower model.init_args.lr or check the loss terms' arguments"
    )


def nonfinite_weights_message(source: str, names: list[str]) -> str:
    """One line: whose weights hold NaN or infinite values, which (the first three) and what to do."""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{source} weights hold NaN or infinite values ({shown}): the run diverged; use an earlier checkpoint"
