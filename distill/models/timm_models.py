"""Any timm model (Wightman, "PyTorch Image Models") behind the staged interface: ``timm/<name>``.

``create_model("timm/convnext_tiny", num_classes=100, in_chans=3)`` builds timm's own network and
wraps it in a :class:`TimmNet` that shares its module, parameter and buffer tables, so parameter
names are timm's (timm checkpoints load with ``strict=True``) and module swaps (SyncBatchNorm,
slimmable layers) reach the network timm runs.

Outputs come from timm's feature API, not hooks:

- ``stages``: ``forward_intermediates`` at the levels of ``feature_info`` whose reduction is at
  least 4 ([chosen] the stride-2 stem output is part of the stem, as in the zoo's ResNets; when no
  level qualifies every level is a stage). Transformers report one level per block: timm reshapes
  the patch tokens of each block to a (C, H, W) map, the prefix (class) tokens are dropped.
- ``feature``: the output of ``forward_features`` (the input of the head) as a map; a token
  sequence is reshaped to the grid of the last stage after dropping the prefix tokens.
- ``embedding``: ``forward_head(x, pre_logits=True)``; ``logits``: ``forward_head(x)``.

A field a network cannot give is listed by :meth:`TimmNet.unavailable_outputs` with the reason, and
a term that reads it is refused when a method is built. The ``stem`` / ``stages`` / ``head`` views
exist where ``forward_features`` is a plain chain of the model's children (most CNNs); that is
checked by a dry run at construction (the views must reproduce ``forward_intermediates`` exactly),
otherwise (transformers, models with functional steps between blocks) a view raises a one-line
reason, which refuses the methods that run parts of a network by themselves (SSKD, SOKD, KR).
"""

from __future__ import annotations

import torch
from torch import nn

from .staged import Chain, Head, StagedNet, StagedOutput

PREFIX = "timm/"
_SHARED_TABLES = ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules")
_PROVIDED = frozenset({"logits", "stages", "feature", "embedding"})


def create_timm(name: str, num_classes: int, in_chans: int, **kwargs) -> TimmNet:
    """``timm.create_model(name, pretrained=False, ...)`` staged; an unknown name is a KeyError."""
    import timm

    if not timm.is_model(name):
        raise KeyError(
            f"unknown timm model {name!r} (timm {timm.__version__}): timm.list_models('*{name.split('_')[0]}*') "
            "lists the names"
        )
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    return TimmNet(PREFIX + name, model, in_chans)


class TimmHead(Head):
    """The head view: ``pre`` (layers of ``forward_features`` after the last stage), then timm's
    ``forward_head``: pooling (and any norm/MLP) up to the embedding, then ``classifier``. ``rest``
    holds the layers ``forward_head`` runs, so the view's parameters are all the head's."""

    def __init__(self, net: TimmNet, pre: nn.Module, rest: list[nn.Module]):
        super().__init__(net.timm_model.get_classifier(), pre)
        self.rest = nn.ModuleList(rest)
        self.__dict__["net"] = net  # unregistered: a view does not own its network

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.pre(x)
        return self.net.feature_map(feature), self.net.timm_model.forward_head(feature, pre_logits=True)

    def without_pre(self) -> TimmHead:
        return TimmHead(self.net, Chain(), list(self.rest))


class TimmNet(StagedNet):
    """A timm model behind the staged interface (see the module docstring)."""

    def __init__(self, name: str, model: nn.Module, in_chans: int = 3):
        super().__init__()
        if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
            raise ValueError(f"{name}: this timm model has no forward_intermediates/feature_info (timm's feature API)")
        for table in _SHARED_TABLES:
            self.__dict__[table] = model.__dict__[table]
        self.__dict__["timm_model"] = model
        self.name = name
        self.prefix_tokens = getattr(model, "num_prefix_tokens", 0)
        levels = [i for i, info in enumerate(model.feature_info) if info["reduction"] >= 4]
        self.stage_indices = levels or list(range(len(model.feature_info)))
        self._unavailable = {
            f: "timm's feature API does not expose it" for f in StagedOutput._fields if f not in _PROVIDED
        }
        self._view_names: tuple | None = None  # names of stem, each stage, head pre, rest of head; set if they replay
        self._views_reason = ""
        self._inspect(in_chans)

    # ---- construction-time checks -------------------------------------------------------------
    def _inspect(self, in_chans: int) -> None:
        """One dry run (eval mode, default input size) that finds what this network can serve."""
        model = self.timm_model
        # the input size the model was built for (a ViT made with img_size=... takes no other)
        size = getattr(getattr(model, "patch_embed", None), "img_size", None) or model.pretrained_cfg["input_size"][1:]
        param = next(self.parameters())
        # a random image: on a constant one, different layer chains can coincide
        probe = torch.randn(1, in_chans, *size, generator=torch.Generator().manual_seed(0)).to(param)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                final, stages = model.forward_intermediates(probe, indices=self.stage_indices)
                if self.feature_map(final, stages[-1]) is None:
                    self._unavailable["feature"] = (
                        f"forward_features returns shape {tuple(final.shape)}, which is not a map "
                        "nor prefix tokens plus the last stage's grid"
                    )
                self._views_reason = self._find_views(probe, final, stages)
        finally:
            self.train(was_training)

    def _find_views(self, probe: torch.Tensor, final: torch.Tensor, stages: list[torch.Tensor]) -> str:
        """Cut the children into stem / stage chains / head ``pre`` at the stage modules and replay
        them on ``probe``; '' when they reproduce ``forward_intermediates`` exactly, else why not."""
        if final.dim() != 4:
            return "it runs on token sequences, with functional steps between its blocks"
        cuts = [self.timm_model.feature_info[i]["module"] for i in self.stage_indices]
        leaves = _leaves(self, "", set(cuts))
        names = [name for name, _ in leaves]
        if any(cut not in names for cut in cuts):
            return "its stage modules are not a chain of its children"
        ends = [names.index(cut) for cut in cuts]
        stem = names[: ends[0]]
        groups = [names[a + 1 : b + 1] for a, b in zip([ends[0] - 1, *ends], ends)]
        tail = names[ends[-1] + 1 :]
        x = _run(self._chain(stem), probe)
        for group, expected in zip(groups, stages):
            x = _run(self._chain(group), x)
            if not _same(x, expected):
                return "running its children in order does not reproduce its stage outputs"
        # the head's ``pre``: the shortest run of the following children that gives forward_features
        pre = next((tail[:k] for k in range(len(tail) + 1) if _same(_run(self._chain(tail[:k]), x), final)), None)
        if pre is None:
            return "no run of the children after its last stage reproduces forward_features"
        model = self.timm_model
        if not _same(model.get_classifier()(model.forward_head(final, pre_logits=True)), model.forward_head(final)):
            return "its head is not one classifier applied to forward_head(pre_logits=True)"
        if {id(p) for _, module in leaves for p in module.parameters()} != {id(p) for p in self.parameters()}:
            return "it holds parameters outside its children"
        self._view_names = (stem, groups, pre, tail[len(pre) :])
        return ""

    def _chain(self, names: list[str]) -> Chain:
        """A view running the named submodules in order, looked up now (module swaps reach it)."""
        return Chain(*(self._submodule(name) for name in names))

    def _submodule(self, name: str) -> nn.Module:
        """The submodule at a dotted ``name``, read from the module tables: attribute lookup would find
        this class's views where timm names children ``stem``, ``stages`` or ``head`` (ConvNeXt)."""
        module: nn.Module = self
        for part in name.split("."):
            module = module._modules[part]
        return module

    # ---- the staged interface -----------------------------------------------------------------
    def unavailable_outputs(self) -> dict[str, str]:
        return dict(self._unavailable)

    def runnable_views(self) -> tuple[nn.Module, list[nn.Module], nn.Module]:
        """``(stem, stages, head pre)``, built at every call, or a ValueError naming why this network has none."""
        if self._view_names is None:
            raise ValueError(
                f"{self.name} cannot be run stage by stage ({self._views_reason}): methods that run parts "
                "of a network by themselves (SSKD, SOKD, KR) cannot use it; KD, DML and the terms can"
            )
        stem, groups, pre, _ = self._view_names
        return self._chain(stem), [self._chain(group) for group in groups], self._chain(pre)

    @property
    def stem(self) -> nn.Module:
        return self.runnable_views()[0]

    @property
    def stages(self) -> list[nn.Module]:
        return list(self.runnable_views()[1])

    @property
    def head(self) -> Head:
        pre = self.runnable_views()[2]
        return TimmHead(self, pre, [self._submodule(name) for name in self._view_names[3]])

    def train(self, mode: bool = True):
        super().train(mode)
        self.timm_model.training = mode  # the shared tables reach every child, not the model's own flag
        return self

    def feature_map(self, final: torch.Tensor, last_stage: torch.Tensor | None = None) -> torch.Tensor | None:
        """``forward_features``' output as a (B, C, H, W) map, or ``None`` when it is none."""
        if final.dim() == 4:
            return final.permute(0, 3, 1, 2) if getattr(self.timm_model, "output_fmt", "NCHW") == "NHWC" else final
        if final.dim() == 3 and last_stage is not None:
            tokens = final[:, self.prefix_tokens :]
            h, w = last_stage.shape[-2:]
            if tokens.shape[1] == h * w:
                return tokens.transpose(1, 2).reshape(final.shape[0], -1, h, w)
        return None

    def forward_stages(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        indices = self.stage_indices[:upto]
        return self.timm_model.forward_intermediates(x, indices=indices, stop_early=True, intermediates_only=True)

    def forward(self, x: torch.Tensor, features: bool = False):
        model = self.timm_model
        if not features:
            return model(x)
        final, stages = model.forward_intermediates(x, indices=self.stage_indices)
        return StagedOutput(
            model.forward_head(final),
            tuple(stages),
            self.feature_map(final, stages[-1]),
            model.forward_head(final, pre_logits=True),
        )


def _leaves(module: nn.Module, prefix: str, cuts: set[str]) -> list[tuple[str, nn.Module]]:
    """Children in order, opening the Sequential/ModuleList containers that hold a stage module."""
    leaves = []
    for name, child in module.named_children():
        full = prefix + name
        opens = isinstance(child, nn.Sequential | nn.ModuleList) and any(c.startswith(full + ".") for c in cuts)
        leaves += _leaves(child, full + ".", cuts) if opens and full not in cuts else [(full, child)]
    return leaves


def _run(chain: nn.Module, x: torch.Tensor | None) -> torch.Tensor | None:
    """``chain(x)``, or ``None`` where ``x`` is ``None`` or the chain cannot take it."""
    if x is None:
        return None
    try:
        return chain(x)
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return None


def _same(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
