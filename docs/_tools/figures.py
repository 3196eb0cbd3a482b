"""The documentation's figures, drawn from the code's own schedules, phase plans and tensor math.

    python docs/_tools/figures.py [--out docs/figures]

``make docs`` runs this before building the site; the PNGs are not committed (``.gitignore``), so a
figure always shows what the code does today. Every number drawn comes from a call into ``distill``:
the PWKD stages and LR from the :class:`distill.callbacks.stages.StagePlan` callback set up on a real
:class:`distill.methods.pwkd.PWKD` (its ``stage_schedule``), the SSKD phases from
:class:`distill.methods.sskd.SSKD` under the same plan, the SOKD bridge from a real
:class:`distill.methods.sokd.SOKD`, KR's aggregation and matching from :mod:`distill.losses.kr`
and :func:`distill.methods.kr.match_layers`. Nothing is read from disk and no weights are trained.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch  # noqa: E402

from distill.callbacks.stages import StagePlan  # noqa: E402
from distill.losses.kr import aggregate_weight, group_membership, rescale_to_std, top_fraction_mask  # noqa: E402
from distill.methods.kr import KR, match_layers  # noqa: E402
from distill.methods.pwkd import PWKD  # noqa: E402
from distill.methods.sokd import SOKD, sokd_losses  # noqa: E402
from distill.methods.sskd import SSKD  # noqa: E402
from distill.models import create_model  # noqa: E402

CIFAR_EPOCHS = 240  # the CRD protocol's budget, split by the stage plan
SAMPLES_PER_EPOCH = 8  # LR curves are drawn at fractional epochs, as the engine steps them
TRAINED, NO_GRAD, NOT_RUN = "#2e7d32", "#90a4ae", "#ffffff"
STUDENT, TEACHER, BRIDGE = "#1565c0", "#78909c", "#ef6c00"


def save(fig, path: Path, rect: tuple | None = None) -> Path:
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fake_trainer(max_epochs: int) -> SimpleNamespace:
    """What the StagePlan callback reads from the Trainer in ``setup``."""
    return SimpleNamespace(max_epochs=max_epochs)


def epochs_axis(max_epochs: int) -> np.ndarray:
    return np.arange(max_epochs * SAMPLES_PER_EPOCH) / SAMPLES_PER_EPOCH


def shade(ax, bounds: list[int]) -> None:
    for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if k % 2:
            ax.axvspan(start, end, color="0.93", zorder=0)


# ---- PWKD ------------------------------------------------------------------------------------------
def planned(module, **plan_args):
    """``module`` with a StagePlan set up on it, as ``distill fit`` does at fit start (``--stages.*``)."""
    plan = StagePlan(**plan_args)
    plan.setup(fake_trainer(CIFAR_EPOCHS), module, "fit")
    return plan, module


def lr_curve(module, x: np.ndarray) -> list[float]:
    """The LR multiplier the module's optimiser follows: the plan's schedule, else the configured one."""
    schedule = module.stage_schedule or module.lr_schedule
    return [schedule(e) for e in x]


def pwkd_setup(plan_args: dict | None = None, **model_args) -> tuple[StagePlan, PWKD]:
    """A small random PWKD under a StagePlan."""
    return planned(PWKD(student="resnet8", teacher="resnet20", num_classes=100, **model_args), **(plan_args or {}))


def pwkd_figure(out: Path) -> Path:
    variants = {  # (stages.* arguments, PWKD arguments)
        "default: cyclic, partial → whole": ({}, {}),
        "ablation: stages.lr monotone": ({"lr": "monotone"}, {}),
        "ablation: reversed order": ({}, dict(stage_widths=[1.0, 0.75, 0.5, 0.25], reverse_order=True)),
        "ablation: stage_widths 0.5, 0.75, 1.0": ({}, dict(stage_widths=[0.5, 0.75, 1.0])),
    }
    x = epochs_axis(CIFAR_EPOCHS)
    epochs = np.arange(CIFAR_EPOCHS + 1)
    fig, (ax_w, ax_lr) = plt.subplots(2, 1, figsize=(11.5, 5.4), sharex=True, height_ratios=[1, 1.3])
    colors = ["#1565c0", "#c62828", "#6a1b9a", "#00897b"]
    for (label, (plan_args, model_args)), color in zip(variants.items(), colors):
        plan, module = pwkd_setup(plan_args, **model_args)
        widths = [module.stage_widths[plan.stage_of(min(e, CIFAR_EPOCHS - 1))] for e in epochs]
        style = "-" if color == colors[0] else "--"
        ax_w.step(epochs, widths, where="post", color=color, ls=style, lw=2 if style == "-" else 1.3, label=label)
        if label.startswith(("default", "ablation: stages.lr")):
            ax_lr.plot(x, lr_curve(module, x), color=color, ls=style, label=label)
        if color == colors[0]:
            bounds = plan.bounds
    _, baseline = pwkd_setup({"lr": "base"}, stage_widths=[1.0])  # whole_teacher_baseline.yaml: the model's own LR
    label = f"baseline: stages.lr base ({type(baseline.lr_schedule).__name__} {baseline.lr_schedule.milestones})"
    ax_lr.plot(x, lr_curve(baseline, x), color="0.4", ls=":", label=label)
    for ax in (ax_w, ax_lr):
        shade(ax, bounds)
    ax_w.set_ylabel("teacher width")
    ax_w.set_yticks([0.25, 0.5, 0.75, 1.0])
    ax_w.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax_w.set_title(
        f"PWKD on the CIFAR protocol ({CIFAR_EPOCHS} epochs): stages declared by PWKD, epochs and LR from StagePlan",
        fontsize=10,
    )
    ax_lr.set_ylabel("LR / base LR")
    ax_lr.set_xlabel("epoch")
    ax_lr.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save(fig, out / "pwkd_schedule.png")


# ---- SSKD ------------------------------------------------------------------------------------------
def sskd_setup(plan_args: dict | None = None, **model_args) -> SSKD:
    module = SSKD(student="resnet20", teacher="resnet56", num_classes=100, **model_args)
    return planned(module, **(plan_args or {}))[1]


def part_names(module: SSKD) -> list[str]:
    stages = [f"stage {k + 1}" for k in range(len(module.adapters))]
    stages[0] += " + stem"
    return [*stages, "final norm", "classifier"]


def draw_phase_grid(ax, module: SSKD, title: str) -> None:
    """Rows: the student's parts; columns: phases; colour: trained / run without autograd / not run."""
    names = part_names(module)
    for column, phase in enumerate(module.phases):
        for row in range(len(names)):
            if phase.first <= row <= phase.last:
                color = TRAINED
            elif row < phase.first:
                color = NO_GRAD
            else:
                color = NOT_RUN
            ax.add_patch(plt.Rectangle((column, row), 1, 1, facecolor=color, edgecolor="0.3", lw=0.6))
            if row in phase.mimic:
                ax.text(
                    column + 0.5,
                    row + 0.5,
                    f"MSE to\nT stage {row + 1}",
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="white",
                )
            if phase.ce and row == len(names) - 1:
                ax.text(column + 0.5, row + 0.5, "CE", ha="center", va="center", fontsize=7, color="white")
        epochs = module.stage_bounds[column + 1] - module.stage_bounds[column]
        ax.text(column + 0.5, -0.15, f"{phase.name}\n{epochs} ep.", ha="center", va="bottom", fontsize=7)
    ax.set_xlim(0, len(module.phases))
    ax.set_ylim(len(names), -0.9)
    ax.set_yticks(np.arange(len(names)) + 0.5, names, fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=8.5)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)


def sskd_figures(out: Path) -> list[Path]:
    variants = {
        "default (stage_by_stage, head_trains: head)": {},
        "freeze_earlier_stages: false": {"freeze_earlier_stages": False},
        "head_trains: last_stage_and_head": {"head_trains": "last_stage_and_head"},
        "plan: joint_mimic": {"plan": "joint_mimic"},
        "plan: joint_ce": {"plan": "joint_ce"},
    }
    fig, axes = plt.subplots(1, len(variants), figsize=(14, 3.2), width_ratios=[4, 4, 4, 2, 1.4])
    for ax, (title, args) in zip(axes, variants.items()):
        draw_phase_grid(ax, sskd_setup(**args), title)
        if ax is not axes[0]:
            ax.set_yticks([])
    fig.legend(
        handles=[
            Patch(facecolor=TRAINED, label="trained"),
            Patch(facecolor=NO_GRAD, label="runs without autograd, BatchNorm in eval mode"),
            Patch(facecolor=NOT_RUN, edgecolor="0.3", label="not run"),
        ],
        loc="lower center",
        ncol=3,
        fontsize=8,
    )
    fig.suptitle("SSKD phases for resnet56 → resnet20 (3 stages): what each phase trains", fontsize=10)
    grid = save(fig, out / "sskd_phases.png", rect=(0, 0.08, 1, 0.95))

    x = epochs_axis(CIFAR_EPOCHS)
    fig, ax = plt.subplots(figsize=(9, 2.8))
    cosine = sskd_setup()
    step = sskd_setup({"lr": "step"})
    ax.plot(x, lr_curve(cosine, x), color="#1565c0", label="stages.lr: own (cyclic cosine, default)")
    ax.plot(x, lr_curve(step, x), color="#c62828", ls="--", label="stages.lr: step (ablation)")
    shade(ax, cosine.stage_bounds)
    for start, end, phase in zip(cosine.stage_bounds[:-1], cosine.stage_bounds[1:], cosine.phases):
        ax.text((start + end) / 2, 1.04, phase.name, ha="center", fontsize=7)
    ax.set_ylim(0, 1.12)
    ax.set_xlabel("epoch")
    ax.set_ylabel("LR / base LR")
    ax.legend(fontsize=7, loc="center right")
    ax.set_title("SSKD learning rate: one stage of the StagePlan per phase", fontsize=9)
    schedule = save(fig, out / "sskd_schedule.png")
    return [grid, schedule]


# ---- SOKD ------------------------------------------------------------------------------------------
def box(ax, x, y, w, h, text, color, dashed=False) -> None:
    ax.add_patch(
        FancyBboxPatch(
            (x, y),
            w,
            h,
            boxstyle="round,pad=0.02",
            facecolor=color,
            edgecolor="0.2",
            alpha=0.9,
            ls="--" if dashed else "-",
        )
    )
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=7.5, color="white")


def arrow(ax, start, end, text="", color="0.2", dashed=False, rad=0.0, dx=0.0, ha="center") -> None:
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle="-|>",
            mutation_scale=10,
            color=color,
            ls="--" if dashed else "-",
            connectionstyle=f"arc3,rad={rad}",
        )
    )
    if text:
        ax.text(
            (start[0] + end[0]) / 2 + dx, (start[1] + end[1]) / 2, text, ha=ha, va="center", fontsize=7, color=color
        )


SOKD_WEIGHTS = {  # sokd_losses' terms and the SOKD arguments that weight them
    "ce": "ce_weight",
    "kl": "kl_weight",
    "kbm_ce": "kbm_ce_weight",
    "kbm_kl_teacher": "kbm_teacher_kl_weight",
    "kbm_kl_student": "kbm_student_kl_weight",
}


def params(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M"


def sokd_figure(out: Path) -> Path:
    module = SOKD(student="wrn_40_1", teacher="wrn_40_2", num_classes=100)
    n, first = len(module.teacher.stages), module.first_stage
    logits = torch.zeros(2, 100)
    terms = sokd_losses(
        logits, logits, logits, torch.zeros(2, dtype=torch.long), module.temperature, **module.loss_weights
    )
    if set(terms) != set(SOKD_WEIGHTS):
        raise RuntimeError(f"sokd_losses returns {sorted(terms)}; update SOKD_WEIGHTS in {__file__}")
    weights = {name: module.loss_weights[key] for name, key in SOKD_WEIGHTS.items()}
    fig, ax = plt.subplots(figsize=(10, 4.2))
    w, h, gap = 1.1, 0.6, 0.25
    xs = [0.4 + i * (w + gap) for i in range(n + 2)]  # stem, stages, head
    rows = {"teacher": 2.6, "kbm": 1.4, "student": 0.0}
    teacher_parts = ["stem", *[f"stage {k + 1}" for k in range(n)], "head"]
    for i, name in enumerate(teacher_parts):
        box(ax, xs[i], rows["teacher"], w, h, name, TEACHER)
    box(ax, xs[-1] + w + gap, rows["teacher"], 0.7, h, "p_T", TEACHER)
    bridged = [f"stage {k + 1}" for k in range(first, n)] + ["head"]
    for i, name in enumerate(bridged):
        box(ax, xs[first + 1 + i], rows["kbm"], w, h, name + "\n(copy)", BRIDGE)
    box(ax, xs[-1] + w + gap, rows["kbm"], 0.7, h, "p_A", BRIDGE)
    for i, name in enumerate(["stem", *[f"stage {k + 1}" for k in range(len(module.student.stages))], "head"]):
        box(ax, xs[i], rows["student"], w, h, name, STUDENT)
    box(ax, xs[-1] + w + gap, rows["student"], 0.7, h, "p_S", STUDENT)
    feed = (xs[first] + w, rows["teacher"])
    arrow(
        ax,
        (feed[0] - w / 2, rows["teacher"]),
        (xs[first + 1] + w / 2, rows["kbm"] + h),
        "detached",
        TEACHER,
        True,
        dx=0.15,
        ha="left",
    )
    right = xs[-1] + w + gap + 0.7
    tau = f"τ={module.temperature:g}"
    top, bottom = rows["kbm"] + h, rows["kbm"]
    teacher_kl = f"KL(p_T‖p_A)·{weights['kbm_kl_teacher']:g}"
    arrow(ax, (right - 0.35, rows["teacher"]), (right - 0.35, top), teacher_kl, "0.25", dx=0.1, ha="left")
    student_kl = f"KL(p_A‖p_S)·{weights['kl']:g}"
    arrow(ax, (right - 0.55, bottom), (right - 0.55, rows["student"] + h), student_kl, STUDENT, dx=-0.08, ha="right")
    kbm_kl = f"KL(p_S‖p_A)·{weights['kbm_kl_student']:g}"
    arrow(ax, (right - 0.15, rows["student"] + h), (right - 0.15, bottom), kbm_kl, BRIDGE, dx=0.08, ha="left")
    ax.text(right + 1.4, rows["kbm"] + h / 2, f"KBM: CE·{weights['kbm_ce']:g}", fontsize=7.5, va="center")
    ax.text(right + 1.4, rows["student"] + h / 2, f"student: CE·{weights['ce']:g}", fontsize=7.5, va="center")
    captions = {
        "teacher": (
            f"teacher {module.teacher_info['arch']}: frozen ({params(module.teacher)}), teacher_bn={module.teacher_bn}",
            TEACHER,
        ),
        "kbm": (f"knowledge bridge module: trained ({params(module.kbm)}), bridge_stage={first - n}", BRIDGE),
        "student": (f"student {module.hparams.student}: trained ({params(module.student)})", STUDENT),
    }
    for row, (text, color) in captions.items():
        ax.text(0.4, rows[row] + h + 0.15, text, fontsize=8, color=color)
    ax.set_xlim(0, right + 3.0)
    ax.set_ylim(-0.3, rows["teacher"] + h + 0.5)
    ax.axis("off")
    ax.set_title(
        f"SOKD (wrn_40_2 → wrn_40_1): every KL uses {tau} and detaches its partner; terms {', '.join(terms)}",
        fontsize=8.5,
    )
    return save(fig, out / "sokd_bridge.png")


# ---- KR --------------------------------------------------------------------------------------------
def tiled(weight: torch.Tensor) -> np.ndarray:
    """A conv weight (C_out × C_in × k × k) as a (C_out·k) × (C_in·k) image, one k × k tile per filter tap."""
    c_out, c_in, kh, kw = weight.shape
    return weight.detach().double().permute(0, 2, 1, 3).reshape(c_out * kh, c_in * kw).numpy()


def group_lines(ax, members: torch.Tensor, k: int, vertical: bool) -> None:
    starts = [int(row.nonzero()[0, 0]) for row in members][1:]
    for s in starts:
        (ax.axvline if vertical else ax.axhline)(s * k - 0.5, color="black", lw=1.2)


def kr_aggregation_figure(out: Path) -> Path:
    rho = inspect.signature(KR).parameters["rho"].default
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(8, 6, 3, 3, generator=generator, dtype=torch.float64)
    student_shape = (4, 3, 3, 3)
    student_init = torch.nn.Conv2d(3, 4, 3, bias=False).weight.detach().double()
    aggregated = aggregate_weight(teacher, 1, student_shape)
    prior = rescale_to_std(aggregated, student_init.std(correction=0))
    mask = top_fraction_mask(prior, rho)
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6), width_ratios=[2, 1, 1, 1])
    limit = float(teacher.abs().max())
    axes[0].imshow(tiled(teacher), cmap="RdBu_r", vmin=-limit, vmax=limit)
    group_lines(axes[0], group_membership(8, 4), 3, vertical=False)
    group_lines(axes[0], group_membership(6, 3), 3, vertical=True)
    axes[0].set_title("teacher W_T: 8 filters × 6 inputs × 3×3\n(lines: the student's 4 × 3 groups)", fontsize=8)
    axes[1].imshow(tiled(aggregated), cmap="RdBu_r", vmin=-limit, vmax=limit)
    axes[1].set_title("aggregate_weight: mean per group\n(4 × 3 × 3×3)", fontsize=8)
    p_lim = float(prior.abs().max())
    axes[2].imshow(tiled(prior), cmap="RdBu_r", vmin=-p_lim, vmax=p_lim)
    axes[2].set_title("prior W_D: rescale_to_std\n(to the student's initial std)", fontsize=8)
    axes[3].imshow(tiled(prior) * tiled(mask.double()), cmap="RdBu_r", vmin=-p_lim, vmax=p_lim)
    kept = int(mask.sum())
    axes[3].set_title(
        f"top_fraction_mask, ρ={rho:g}: {kept} of {mask.numel()}\nentries pull on the student", fontsize=8
    )
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        "KR knowledge aggregation of one conv, computed by distill.losses.kr (the project's reading)", fontsize=9.5
    )
    return save(fig, out / "kr_aggregation.png")


def kr_matching_figure(out: Path) -> Path:
    student, teacher = create_model("resnet20"), create_model("resnet56")
    fig, axes = plt.subplots(1, 2, figsize=(11, 7), sharey=False)
    t_names = [n for n, m in teacher.named_modules() if isinstance(m, torch.nn.Conv2d)]
    s_names = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Conv2d)]
    groups = sorted({m.group for m in match_layers(student, teacher)}, key=lambda g: (g != "stem", g == "head", g))
    colors = dict(zip(groups, plt.cm.tab10.colors))
    for ax, level in zip(axes, ("layer", "stage")):
        rows = match_layers(student, teacher, level=level)
        t_y = {n: i / (len(t_names) - 1) for i, n in enumerate(t_names)}
        s_y = {n: i / (len(s_names) - 1) for i, n in enumerate(s_names)}
        for row in rows:
            for name in row.teachers:
                ax.plot(
                    [0, 1],
                    [s_y[row.student], t_y[name]],
                    color=colors[row.group],
                    lw=0.7,
                    alpha=0.8 if level == "layer" else 0.35,
                )
        ax.scatter([0] * len(s_y), list(s_y.values()), s=12, color=STUDENT, zorder=3)
        ax.scatter([1] * len(t_y), list(t_y.values()), s=6, color=TEACHER, zorder=3)
        ax.set_ylim(1.03, -0.03)
        ax.set_xlim(-0.35, 1.35)
        ax.set_xticks([0, 1], [f"resnet20 ({len(s_names)} convs)", f"resnet56 ({len(t_names)} convs)"])
        ax.set_yticks([])
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        ax.set_title(f"level: {level}" + (" (default)" if level == "layer" else ""), fontsize=9)
    axes[0].legend(handles=[Patch(color=colors[g], label=g) for g in groups], fontsize=7, loc="lower left")
    fig.suptitle(
        "KR layer matching by match_layers: each line joins a student conv to a teacher conv its prior "
        "is aggregated from (top: input side)",
        fontsize=9,
    )
    return save(fig, out / "kr_matching.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "figures"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny dry runs: threads only contend on a shared machine
    written = [
        pwkd_figure(out),
        *sskd_figures(out),
        sokd_figure(out),
        kr_aggregation_figure(out),
        kr_matching_figure(out),
    ]
    print("figures: " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
