"""Every method file composes after a pair and under each paradigm that takes terms (PWKD, KR, SOKD's
feature extension): it parses, builds, and one training step sends gradients to the student and to
every connector the step uses, never to the teacher."""

from types import SimpleNamespace

import pytest
import torch
from helpers import CONFIGS

from distill.callbacks import StagePlan
from distill.cli import build_cli
from distill.errors import ConfigError

METHODS = sorted(p.stem for p in (CONFIGS / "methods").glob("*.yaml") if p.stem not in ("dml",))
PARADIGMS = {"pwkd": "digits/pwkd.yaml", "kr": "digits/kr.yaml", "sokd": "digits/sokd.yaml"}
INIT_PHASE = ("ab", "ft", "fsp")
# AB's connector is the identity where the shapes agree and a regressor where they do not: it changes
# structure with the teacher width, so under PWKD it needs connectors of its own per stage.
PWKD_FRESH = ("ab",)
# FSP and KDSVD compare stages of equal channel counts: a narrower teacher has fewer.
PWKD_REFUSED = ("fsp", "kdsvd")


def build(method: str, paradigm: str, *extra: str):
    args = ["--config", str(CONFIGS / "digits/pair.yaml"), "--config", str(CONFIGS / PARADIGMS[paradigm])]
    args += ["--config", str(CONFIGS / f"methods/{method}.yaml"), "--model.init_args.teacher_weights=null"]
    return build_cli([*args, "--trainer.max_epochs=4", *extra], run=False).model


def enter_first_stage(module) -> None:
    """As ``distill fit`` does before the first step: the stage plan sets up and enters epoch 0's stage."""
    plan = StagePlan()
    stages = module.stages()
    plan.setup(SimpleNamespace(max_epochs=sum(s.epochs or 1 for s in stages)), module, "fit")
    plan.enter(SimpleNamespace(current_epoch=0), module)


@pytest.mark.parametrize("paradigm", sorted(PARADIGMS))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_one_step_under_every_paradigm(method, paradigm):
    if paradigm == "sokd" and method in INIT_PHASE:
        with pytest.raises(ConfigError, match="has an initialisation phase, which SOKD does not run"):
            build(method, paradigm)
        return
    if paradigm == "pwkd" and method in PWKD_REFUSED:
        with pytest.raises(ValueError, match="equal channel counts"):
            build(method, paradigm)
        return
    if paradigm == "pwkd" and method in PWKD_FRESH:
        with pytest.raises(ConfigError, match="cannot be sliced \\(set connectors: fresh\\)"):
            build(method, paradigm)
    torch.manual_seed(0)
    fresh = paradigm == "pwkd" and method in PWKD_FRESH
    module = build(method, paradigm, *(["--model.init_args.connectors=fresh"] if fresh else []))
    assert type(module).__name__.lower() == paradigm
    for term in module.terms:
        term.setup_data(torch.arange(64) % 10)  # CRD's memory: one entry per training sample
    for term in module.terms:  # an init-phase term's phase comes first: with init_epochs 1 it is epoch 0
        term.init_epochs = min(term.init_epochs, 1)
    enter_first_stage(module)
    module.train()
    losses, _ = module.training_losses(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)), torch.arange(8))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    trained = module.trained_parameters()
    trained = list(module.student.stages[0].parameters()) if trained is None else trained
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert all(p.grad is None for p in module.teacher.parameters())
    if module.init_phase is None:  # the main step: every connector of every term in use learns
        for name, term in zip(module.term_names, module.terms):
            for pname, p in term.named_parameters():
                if p.requires_grad and not any(p is q for m in term.frozen_after_init() for q in m.parameters()):
                    assert p.grad is not None, f"{method} under {paradigm}: {name}.{pname} got no gradient"
