"""The architecture zoo behind one staged interface, a name registry and safe weight loading."""

# Importing the architecture modules fills the registry.
from . import cifar, imagenet  # noqa: E402,F401
from .registry import create_model, list_models, register
from .staged import Chain, Head, StagedNet, StagedOutput, stage_channels
from .weights import WeightLoadError, load_weights, read_state_dict

__all__ = [
    "Chain",
    "Head",
    "StagedNet",
    "StagedOutput",
    "WeightLoadError",
    "create_model",
    "list_models",
    "load_weights",
    "read_state_dict",
    "register",
    "stage_channels",
]
