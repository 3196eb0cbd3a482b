"""The one stage mechanism: epochs per stage, the LR over a plan, stage entry, plan checks on resume."""

import math
from types import SimpleNamespace

import pytest

from distill.callbacks import StagePlan
from distill.methods import Supervised
from distill.schedules import MultiStep
from distill.stages import Stage, StagedSchedule, stage_epochs

DIGITS = dict(num_classes=10, in_chans=1, image_size=16)


def cosine(t: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * t))


def test_epochs_fixed_stages_keep_theirs_and_the_rest_share():
    init, a, b, c = Stage("init", "constant", epochs=3), Stage("a"), Stage("b"), Stage("c")
    assert stage_epochs([init, a, b, c], 13) == [3, 4, 3, 3]
    assert stage_epochs([a], 7) == [7] and stage_epochs([a], -1) == []  # one stage: the whole run, any length
    assert stage_epochs([init, a], 5, epochs=[1, 4]) == [1, 4]  # explicit epochs override the fixed length
    with pytest.raises(ValueError, match=r"max_epochs=5 cannot be split among the 4 stages \(init, a, b, c\)"):
        stage_epochs([init, a, b, c], 5)
    with pytest.raises(ValueError, match=r"stages.epochs=\[1, 2\] sum to 3, but trainer.max_epochs=4"):
        stage_epochs([a, b], 4, epochs=[1, 2])


def test_schedule_policies_over_a_plan():
    base = MultiStep([2], gamma=0.1)
    s = StagedSchedule([0, 2, 6, 10], ["constant", "base", "cyclic"], base)
    assert [s(e) for e in (0, 1.5)] == [1.0, 1.0]  # the init stage: constant
    assert [s(e) for e in (2, 3.9, 4, 5.9)] == pytest.approx([1, 1, 0.1, 0.1])  # base, counted from epoch 2
    assert [s(e) for e in (6, 8, 10)] == pytest.approx([1, cosine(0.5), 0])  # a cosine within the last stage
    mono = StagedSchedule([0, 2, 6, 10], ["constant", "monotone", "monotone"], base, min_factor=0.1)
    assert [mono(e) for e in (1, 2, 6, 10)] == pytest.approx([1, 1, 0.1 + 0.9 * cosine(0.5), 0.1])
    step = StagedSchedule([0, 4, 8], ["step", "step"], base, step_milestones=(0.5,), step_gamma=0.5)
    assert [step(e) for e in (0, 1.9, 2, 4, 6)] == pytest.approx([1, 1, 0.5, 1, 0.5])
    warm = StagedSchedule([0, 4, 8], ["cyclic", "cyclic"], base, warmup_epochs=1)
    assert [warm(e) for e in (0.5, 4.5)] == pytest.approx([0.5 * cosine(0.5 / 4)] * 2)


def test_plan_overrides_every_stage_but_constant_ones():
    class Staged(Supervised):
        entered: list = []

        def stages(self):
            return [Stage("init", "constant", epochs=1), Stage("one", "cyclic"), Stage("two", "cyclic")]

        def on_stage(self, index, stage):
            super().on_stage(index, stage)
            self.entered.append((index, stage.name))

    module = Staged(model="resnet8", **DIGITS)
    plan = StagePlan(lr="step")
    plan.setup(SimpleNamespace(max_epochs=5), module, "fit")
    assert module.stage_bounds == [0, 1, 3, 5]
    assert module.stage_schedule.policies == ["constant", "step", "step"]
    assert plan.state_dict() == {
        "stages": ["init", "one", "two"],
        "lr": ["constant", "step", "step"],
        "epochs": [1, 2, 2],
    }
    for epoch in range(5):
        plan.enter(SimpleNamespace(current_epoch=epoch), module)
    assert module.entered == [(0, "init"), (1, "one"), (1, "one"), (2, "two"), (2, "two")]
    with pytest.raises(ValueError, match="differs from the checkpoint's"):
        plan.load_state_dict({**plan.state_dict(), "epochs": [1, 1, 3]})


def test_a_plain_method_keeps_its_schedule_and_may_extend_on_resume():
    module = Supervised(model="resnet8", **DIGITS)
    plan = StagePlan()
    plan.setup(SimpleNamespace(max_epochs=5), module, "fit")
    assert module.stage_schedule is None and module.stage_bounds == [0, 5]
    assert plan.state_dict() == {"stages": ["main"], "lr": ["base"]}  # no epochs: max_epochs may change
    plan.load_state_dict({"stages": ["main"], "lr": ["base"]})
    StagePlan(lr="cyclic").setup(SimpleNamespace(max_epochs=4), module, "fit")
    assert module.lr_factor(2) == pytest.approx(0.5)  # one cosine over the run
