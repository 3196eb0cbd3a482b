"""Create any zoo model by name: ``create_model("resnet56", num_classes=100, in_chans=3)``; any timm model
as ``timm/<name>`` (``create_model("timm/convnext_tiny", ...)``, see :mod:`distill.models.timm_models`)."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import UnknownNameError
from .staged import StagedNet

_REGISTRY: dict[str, Callable[..., StagedNet]] = {}


def register(name: str | None = None):
    """Decorator adding a model constructor ``fn(num_classes=..., in_chans=...)`` to the registry."""

    def add(fn):
        key = name or fn.__name__
        if key in _REGISTRY:
            raise ValueError(f"model name {key!r} is registered twice")
        _REGISTRY[key] = fn
        return fn

    return add


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 100, in_chans: int = 3, **kwargs) -> StagedNet:
    if name.startswith("timm/"):
        from .timm_models import create_timm  # imports timm only when a timm model is asked for

        return create_timm(name.removeprefix("timm/"), num_classes=num_classes, in_chans=in_chans, **kwargs)
    if name not in _REGISTRY:
        raise UnknownNameError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}, or any timm model as timm/<name>"
        )
    return _REGISTRY[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
