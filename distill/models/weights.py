"""Safe weight loading, always ``weights_only=True``: plain state_dicts, safetensors files, Lightning
checkpoints and the peers' checkpoint formats.

Peer formats (the network's state_dict is found under the first of ``state_dict``, ``model``, ``net``):

- CRD benchmark (RepDistiller ``train_teacher.py``) teachers, also those mdistiller downloads:
  ``{"epoch", "model", "accuracy" | "best_acc", "optimizer"}``; its ``*_last.pth`` adds ``"opt"``, an
  ``argparse.Namespace``.
- mdistiller runs: ``student_*`` files ``{"model"}``; full ``latest``/``best`` files
  ``{"epoch", "model", "optimizer", "best_acc"}`` whose model is the DataParallel-wrapped distiller
  (``module.student.*``, ``module.teacher.*``): the student is taken.
- torchdistill ``save_ckpt``: ``{"model", "optimizer", "best_value", "lr_scheduler", "args"}`` (``args`` an
  ``argparse.Namespace``).
- community CIFAR checkpoints: a plain state_dict, or ``{"net", "acc", "epoch"}`` (pytorch-cifar style),
  often with DataParallel's ``module.`` prefix.

[chosen] ``argparse.Namespace`` is the one non-container class read (an attribute bag: nothing runs);
any other pickled class is refused, naming it.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import BadFileError, MissingFileError

# The trained network inside a method's checkpoint: ``student.`` (distillation methods) or ``model.``
# (supervised); wrapper prefixes added by DDP (``module.``) and torch.compile (``_orig_mod.``).
_NETWORK_PREFIXES = ("student.", "model.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightLoadError(BadFileError, RuntimeError):
    """Raised when a checkpoint cannot be read or does not fit a model; the message names the file and
    every offending key."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_sentence(error: BaseException) -> str:
    text = str(error).strip().split("\n")[0]
    return text.split(". ")[0].rstrip(".") or type(error).__name__


def load_checkpoint(path: str | Path, mmap: bool = False):
    """The object in ``path``, on the CPU: a ``.safetensors`` file directly, anything else through
    ``torch.load(weights_only=True)`` (which also reads ``argparse.Namespace``, as peers' checkpoints
    hold). Errors name the file and say what to do; a file holding other Python objects is refused,
    never loaded some other way."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as err:
            raise WeightLoadError(
                f"{path}: not a readable safetensors file ({_first_sentence(err)}): copy the file again"
            ) from err
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        reason = (
            f"it pickles {unsupported.group(1)}, which only tensors, plain containers and argparse.Namespace may"
            if unsupported
            else "it holds Python objects other than tensors and plain containers, or is not a torch file"
        )
        hint, error = "if you trust the file, re-save just its state_dict with torch.save", None
    except Exception as err:  # truncated or damaged archives, empty files
        reason, error = f"truncated or damaged: {_first_sentence(err)}", err
        hint = "copy the file again, or use an earlier checkpoint"
    raise WeightLoadError(
        f"{path}: refused to load ({reason}); expected a checkpoint written by distill, a state_dict saved "
        f"with torch.save or a .safetensors file: {hint}"
    ) from error


def read_state_dict(path: str | Path, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``path``: a plain one, ``{"state_dict": ...}`` or ``{"model": ...}``.

    With ``prefix`` only keys under it are kept (and it is stripped); otherwise a method checkpoint's
    network (``student.`` or else ``model.``) is selected, and wrapper prefixes are stripped where
    *every* key carries them.
    """
    obj = load_checkpoint(path)
    for key in ("state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise WeightLoadError(
            f"{path}: expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    obj = _strip_wrappers(obj)
    if prefix is None:
        prefix = next((p for p in _NETWORK_PREFIXES if any(k.startswith(p) for k in obj)), "")
    obj = _strip_wrappers({k[len(prefix) :]: v for k, v in obj.items() if k.startswith(prefix)})
    if not obj:
        raise WeightLoadError(f"{path}: no key starts with {prefix!r}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightLoadError(f"{path}: expected tensors, but these entries are not: {', '.join(not_tensors[:10])}")
    return obj


def _strip_wrappers(state: dict) -> dict:
    """Remove DDP/compile prefixes carried by every key."""
    for p in _WRAPPER_PREFIXES * 2:
        if state and all(k.startswith(p) for k in state):
            state = {k[len(p) :]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path, prefix: str | None = None, strict: bool = True) -> nn.Module:
    """Load ``path`` into ``model``; with ``strict`` any missing, unexpected or mis-shaped key is an error."""
    state = read_state_dict(path, prefix)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"{path} does not fit {type(model).__name__}:"]
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if keys:
                lines.append(f"  {label} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise WeightLoadError("\n".join(lines))
    model.load_state_dict(state, strict=strict)
    return model
