"""Pretrained weights by name, offline-first: ``torchvision:<WeightsEnum>`` and ``timm:<model>[.<tag>]``.

A name is resolved to a file in the local cache only; nothing is downloaded. When the file is
missing, the error names the file and the directory to put it in.

- ``torchvision:ResNet34_Weights.IMAGENET1K_V1``: the file torchvision downloads to the torch-hub
  cache, ``$TORCH_HOME/hub/checkpoints/<file of the weights' URL>`` (``torch.hub.get_dir()``).
- ``timm:resnet50.a1_in1k`` (``timm:resnet50`` takes timm's default tag): the file timm downloads from
  the Hugging Face hub (``model.safetensors``, else ``pytorch_model.bin`` of the repository
  ``timm/resnet50.a1_in1k``), looked up in the hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``,
  else ``~/.cache/huggingface/hub``) as ``huggingface_hub`` lays it out; a file copied by hand goes to
  ``<cache>/models--timm--resnet50.a1_in1k/snapshots/main/``.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch

TORCHVISION = "torchvision:"
TIMM = "timm:"
HF_FILES = ("model.safetensors", "pytorch_model.bin")


def is_named(weights: str | None) -> bool:
    return bool(weights) and weights.startswith((TORCHVISION, TIMM))


def resolve_named(weights: str, arch: str, key: str = "teacher_weights") -> Path:
    """The cached file of the named ``weights`` for the zoo architecture ``arch``; errors name ``key``."""
    if weights.startswith(TORCHVISION):
        return torchvision_file(weights.removeprefix(TORCHVISION), arch, key)
    return timm_file(weights.removeprefix(TIMM), arch, key)


def torchvision_file(name: str, arch: str, key: str = "teacher_weights") -> Path:
    import torchvision

    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError) as err:
        raise ValueError(
            f"{key}={TORCHVISION}{name}: not a torchvision weights name "
            "(expected <Enum>.<value>, e.g. ResNet34_Weights.IMAGENET1K_V1)"
        ) from err
    if arch in torchvision.models.list_models():
        expected = torchvision.models.get_model_weights(arch)
        if type(weights) is not expected:
            raise ValueError(
                f"{key}={TORCHVISION}{name} are not weights of {arch} (its weights are {expected.__name__})"
            )
    file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if not file.is_file():
        raise FileNotFoundError(
            f"{key}={TORCHVISION}{name} is not cached: put {file.name} (from {weights.url}) into {file.parent}"
        )
    return file


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache directory, from the environment as ``huggingface_hub`` reads it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def timm_file(name: str, arch: str, key: str = "teacher_weights") -> Path:
    import timm
    from huggingface_hub import try_to_load_from_cache

    model = name.split(".", 1)[0]
    if arch.startswith("timm/") and arch.removeprefix("timm/") != model:
        raise ValueError(f"{key}={TIMM}{name} are weights of timm/{model}, not of the teacher {arch}")
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as err:  # a known model with an unknown tag
        raise ValueError(f"{key}={TIMM}{name}: {err}") from err
    if cfg is None or not cfg.hf_hub_id:
        raise ValueError(
            f"{key}={TIMM}{name}: timm {timm.__version__} knows no Hugging Face weights of that name "
            f"(list them with timm.list_pretrained('{model}*'))"
        )
    repo = cfg.hf_hub_id
    cache = hf_hub_cache()
    for filename in (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_FILES:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache)
        if isinstance(found, str):
            return Path(found)
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "main"
    raise FileNotFoundError(
        f"{key}={TIMM}{name} is not cached: put {cfg.hf_hub_filename or HF_FILES[0]} into {snapshot} "
        f"(or, where the network is reachable, run: hf download {repo} --cache-dir {cache})"
    )
