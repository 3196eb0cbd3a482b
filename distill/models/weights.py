"""Safe weight loading: plain state_dicts or Lightning checkpoints, always ``weights_only=True``."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
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
    """``torch.load(path, weights_only=True)`` onto the CPU, with errors that name the file and say what
    to do. A file holding Python objects other than tensors and plain containers is refused, never
    loaded some other way."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        reason = "it holds Python objects other than tensors and plain containers, or is not a torch file"
        error = None
    except Exception as err:  # truncated or damaged archives, empty files
        reason, error = f"truncated or damaged: {_first_sentence(err)}", err
    raise WeightLoadError(
        f"{path}: refused to load ({reason}); expected a checkpoint written by distill or a state_dict saved "
        "with torch.save: copy the file again, or use an earlier checkpoint"
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
