"""Safe weight loading: plain state_dicts or Lightning checkpoints, always ``weights_only=True``."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

# Prefixes added by Lightning modules (``model.``, ``student.``), DDP (``module.``) and torch.compile.
_PREFIXES = ("model.", "student.", "module.", "_orig_mod.")


class WeightLoadError(RuntimeError):
    """Raised when a checkpoint does not fit a model; the message names every offending key."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``path``: a plain one, ``{"state_dict": ...}`` or ``{"model": ...}``.

    With ``prefix`` only keys under it are kept (and it is stripped); otherwise the known wrapper
    prefixes are stripped where *every* key carries them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle payloads and corrupt files both end here
        raise WeightLoadError(
            f"{path}: refused to load (only tensors and plain containers are accepted, "
            f"weights_only=True): {err}"
        ) from err
    for key in ("state_dict", "model", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightLoadError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    if prefix is not None:
        obj = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
        if not obj:
            raise WeightLoadError(f"{path}: no key starts with {prefix!r}")
        return obj
    changed = True
    while changed and obj:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in obj):
                obj = {k[len(p):]: v for k, v in obj.items()}
                changed = True
    return obj


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
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise WeightLoadError("\n".join(lines))
    model.load_state_dict(state, strict=strict)
    return model
