"""Host overhead per training step, paired step by step: every ``distill fit`` step next to a plain-loop step.

``step_overhead.py`` times whole fits against each other, and on a shared 2-core machine the plain
loop alone moves by 10-15 % from one fit to the next: as much as the gap to be measured. Here a
callback (:mod:`pairing`) runs one step of the plain loop after every training step of the fit, in
the same process: ``step_overhead.PlainParts``, the same data, crop + flip, networks, CE 0.1 + KD 0.9,
SGD and LR schedule, with networks and an optimiser of its own. Every ``distill`` step then has a
plain step beside it in time, under the same machine load, so drifts cancel in the per-step
differences, and the mean over hundreds of pairs has a standard error small enough to test a
1.5 ms target. A ``distill`` step is a whole loop iteration (batch fetch, transfer and
augmentation, the step, the hooks, logging steps, the LR scheduler), as
:class:`pairing.PairedPlainSteps` measures it; the fit is the real CLI's, as in ``step_overhead.py``.

Reported per batch size, over every pair of every repeat after the first tenth of each fit
(warm-up): both sides' mean seconds per step, the ratio of the means, the host overhead (the mean
per-step difference, with its 95 % confidence interval, ±1.96 standard errors; the ratio's interval
is the same interval over the plain step's mean), the median difference and every repeat's mean.
``--lightning`` pairs a bare LightningModule's fit with the plain loop the same way: Lightning's own
cost, and what ``distill`` adds to it as the difference of the two overheads. ``--manual`` pairs the
same bare module in manual optimisation (``automatic_optimization = False``: zero_grad, backward,
step and the scheduler in ``training_step``), the least of Lightning's loop any LightningModule can
run. ``--variant NAME=ARGS`` (repeatable) adds a ``distill fit`` with extra CLI arguments as a
side of its own, paired the same way, and reports its cost against the plain distill side: what an
option costs per step (e.g. ``bar="--trainer.enable_progress_bar=true"``). Every repeat runs in a
fresh process (``--quick``: in this one, on a tiny fake Fashion-MNIST; a smoke test, not a
measurement).

CPU only: on CUDA every per-step clock would have to synchronise the device, which removes the
overlap of host and device work that a GPU step relies on; there ``step_overhead.py`` times whole fits.

    python benchmarks/step_pairs.py [--batch-sizes 128 4] [--repeats 3] [--lightning] [--manual] [--calibrate]
                                    [--variant NAME=ARGS ...]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pairing  # noqa: E402
from common import parser, print_table, run_json_child, write_fake_fashion_mnist, write_json  # noqa: E402
from step_overhead import BARE, FASHION_MNIST, PlainParts, distill_fit, lightning_fit  # noqa: E402

MANUAL = "lightning_manual"  # with --manual: the bare module in manual optimisation
CALIBRATION = "plain"  # with --calibrate: the plain loop paired with itself, the instrument's own bias (expected 0)
OPTIONS = {"compile": None, "channels_last": False}
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
WARMUP_PART = 10  # the first 1/WARMUP_PART of each fit's pairs are dropped (first-call costs)
Z95 = 1.96


def default_steps(batch_size: int) -> int:
    """Steps per fit: about 40 s of plain-loop compute on the 2-core CPU."""
    return 70 if batch_size > 32 else 600


def paired_fit(
    side: str, data_dir: Path, batch_size: int, steps: int, clock: str, variants: dict[str, str]
) -> list[tuple[float, float]]:
    """``(fit step s, plain step s)`` of every step of one fit of ``side`` after the warm-up."""
    plain = PlainParts(data_dir, "cpu", OPTIONS)
    batches = plain.batches(batch_size)
    pairs: list[tuple[float, float]] = []
    pairing.ARMED.update(plain_step=lambda: plain.train_step(*next(batches)), clock=CLOCKS[clock], pairs=pairs)
    with tempfile.TemporaryDirectory() as logs:
        if side == "distill" or side in variants:
            extra = ("--trainer.callbacks+=pairing.PairedPlainSteps", *shlex.split(variants.get(side, "")))
            distill_fit(data_dir, batch_size, steps, "cpu", OPTIONS, Path(logs), extra=extra)
        elif side in (BARE, MANUAL):
            callbacks = (pairing.PairedPlainSteps(),)
            lightning_fit(data_dir, batch_size, steps, "cpu", OPTIONS, callbacks=callbacks, manual=side == MANUAL)
        else:  # CALIBRATION: a second plain loop, timed by the same callback's hooks
            own, timer = PlainParts(data_dir, "cpu", OPTIONS), pairing.PairedPlainSteps()
            own_batches = own.batches(batch_size)
            for step in range(steps):
                timer.on_train_batch_start(None, None, None, step)
                own.train_step(*next(own_batches))
                timer.on_train_batch_end(None, None, None, None, step)
    return pairs[len(pairs) // WARMUP_PART :]


def run_repeat(sides: list[str], data_dir: Path, batch_size: int, steps: int, args) -> dict[str, list]:
    """The paired fits of one repeat, ``sides`` in order, in a fresh process (in this one with ``--quick``)."""
    if args.quick:
        return {side: paired_fit(side, data_dir, batch_size, steps, args.clock, args.variants) for side in sides}
    arguments = ["--child", ",".join(sides), "--data-dir", str(data_dir), "--batch-sizes", str(batch_size)]
    arguments += ["--steps", str(steps), "--clock", args.clock]
    arguments += [f"--variant={name}={extra}" for name, extra in args.variants.items()]
    what = f"{','.join(sides)} (batch {batch_size})"
    return run_json_child(str(Path(__file__).resolve()), arguments, args.threads, what)


def difference(a: dict, b: dict) -> tuple[float, list[float]]:
    """``a``'s overhead minus ``b``'s (ms/step), with the 95 % interval of two independent estimates."""
    half = math.hypot(*((high - low) / 2 for low, high in (a["overhead_ms_ci95"], b["overhead_ms_ci95"])))
    value = a["overhead_ms"] - b["overhead_ms"]
    return value, [value - half, value + half]


def overhead(repeats: list[list[tuple[float, float]]]) -> dict:
    """Means, ratio and the mean per-step difference (ms) with its 95 % interval, pooled over repeats."""
    pairs = [pair for repeat in repeats for pair in repeat]
    fit, plain = [f for f, _ in pairs], [p for _, p in pairs]
    diff_ms = [1e3 * (f - p) for f, p in pairs]
    half = Z95 * statistics.stdev(diff_ms) / math.sqrt(len(diff_ms)) if len(diff_ms) > 1 else float("nan")
    mean_ms, plain_mean = statistics.fmean(diff_ms), statistics.fmean(plain)
    return {
        "pairs": len(pairs),
        "s_per_step": statistics.fmean(fit),
        "plain_s_per_step": plain_mean,
        "ratio": statistics.fmean(fit) / plain_mean,
        "ratio_ci95": [1 + (mean_ms - half) / 1e3 / plain_mean, 1 + (mean_ms + half) / 1e3 / plain_mean],
        "overhead_ms": mean_ms,
        "overhead_ms_ci95": [mean_ms - half, mean_ms + half],
        "overhead_ms_median": statistics.median(diff_ms),
        "overhead_ms_per_repeat": [1e3 * statistics.fmean(f - p for f, p in repeat) for repeat in repeats],
    }


def measure(data_dir: Path, args) -> list[dict]:
    optional = ((BARE, args.lightning), (MANUAL, args.manual), (CALIBRATION, args.calibrate))
    sides = ["distill", *(side for side, wanted in optional if wanted), *args.variants]
    rows = []
    for batch_size in args.batch_sizes:
        steps = args.steps or default_steps(batch_size)
        pairs: dict[str, list] = {side: [] for side in sides}
        for repeat in range(args.repeats):
            order = sides if repeat % 2 == 0 else sides[::-1]
            for side, side_pairs in run_repeat(order, data_dir, batch_size, steps, args).items():
                pairs[side].append([tuple(pair) for pair in side_pairs])
                print(f"repeat {repeat}: {side} batch {batch_size}: {overhead(pairs[side][-1:])}", flush=True)
        result = {side: overhead(pairs[side]) for side in sides}
        distill = result["distill"]
        row = {
            "batch_size": batch_size,
            "steps": steps,
            "repeats": args.repeats,
            "pairs": distill["pairs"],
            "distill_s_per_step": distill["s_per_step"],
            "plain_s_per_step": distill["plain_s_per_step"],
            "ratio": distill["ratio"],
            "ratio_ci95": distill["ratio_ci95"],
            "host_overhead_ms": distill["overhead_ms"],
            "host_overhead_ms_ci95": distill["overhead_ms_ci95"],
            "host_overhead_ms_median": distill["overhead_ms_median"],
            "host_overhead_ms_per_repeat": distill["overhead_ms_per_repeat"],
        }
        if args.lightning:  # Lightning's own cost, and distill's on top of it (independent intervals)
            bare = result[BARE]
            over, over_ci = difference(distill, bare)
            row |= {
                f"{BARE}_s_per_step": bare["s_per_step"],
                f"{BARE}_overhead_ms": bare["overhead_ms"],
                f"{BARE}_overhead_ms_ci95": bare["overhead_ms_ci95"],
                f"distill_over_{BARE}_ms": over,
                f"distill_over_{BARE}_ms_ci95": over_ci,
            }
        if args.manual:
            manual = result[MANUAL]
            row |= {
                f"{MANUAL}_overhead_ms": manual["overhead_ms"],
                f"{MANUAL}_overhead_ms_ci95": manual["overhead_ms_ci95"],
            }
        if args.calibrate:
            own = result[CALIBRATION]
            row |= {"calibration_ms": own["overhead_ms"], "calibration_ms_ci95": own["overhead_ms_ci95"]}
        row["variants"] = {}
        for name, extra in args.variants.items():
            cost, cost_ci = difference(result[name], distill)
            row["variants"][name] = {
                "arguments": extra,
                **result[name],
                "over_distill_ms": cost,
                "over_distill_ms_ci95": cost_ci,
            }
        rows.append(row)
    return rows


def interval(value: float, bounds: list[float], fmt: str) -> str:
    """``value [low, high]``."""
    return f"{value:{fmt}} [{bounds[0]:{fmt}}, {bounds[1]:{fmt}}]"


def report(rows: list[dict], args) -> None:
    print_table(
        f"distill fit vs a plain PyTorch loop, paired step by step (cpu, NCHW, {args.clock} clock; Fashion-MNIST, "
        f"KD resnet20 -> resnet8; means over the pairs of {args.repeats} repeats, 95 % intervals)",
        [
            "batch",
            "pairs",
            "distill s/step",
            "plain s/step",
            "ratio [95 %]",
            "host overhead ms/step [95 %]",
            "median ms",
            "repeats' means ms",
        ],  # fmt: skip
        [
            [
                r["batch_size"],
                r["pairs"],
                f"{r['distill_s_per_step']:.4f}",
                f"{r['plain_s_per_step']:.4f}",
                interval(r["ratio"], r["ratio_ci95"], ".3f"),
                interval(r["host_overhead_ms"], r["host_overhead_ms_ci95"], ".2f"),
                f"{r['host_overhead_ms_median']:.2f}",
                ", ".join(f"{v:.2f}" for v in r["host_overhead_ms_per_repeat"]),
            ]
            for r in rows
        ],
    )
    if args.lightning:
        print_table(
            "the overhead split: a bare LightningModule doing the plain loop's work, paired the same way (ms/step)",
            ["batch", "bare Lightning s/step", "Lightning - plain [95 %]", "distill - bare Lightning [95 %]"],
            [
                [
                    r["batch_size"],
                    f"{r[f'{BARE}_s_per_step']:.4f}",
                    interval(r[f"{BARE}_overhead_ms"], r[f"{BARE}_overhead_ms_ci95"], ".2f"),
                    interval(r[f"distill_over_{BARE}_ms"], r[f"distill_over_{BARE}_ms_ci95"], ".2f"),
                ]
                for r in rows
            ],
        )
    for r in rows if args.manual else []:
        manual = interval(r[f"{MANUAL}_overhead_ms"], r[f"{MANUAL}_overhead_ms_ci95"], ".2f")
        print(f"manual optimisation, batch {r['batch_size']}: the bare module, {manual} ms/step over the plain loop")
    for r in rows:
        for name, v in r["variants"].items():
            print(
                f"variant {name} ({v['arguments']}), batch {r['batch_size']}: "
                f"{interval(v['overhead_ms'], v['overhead_ms_ci95'], '.2f')} ms/step over the plain loop, "
                f"{interval(v['over_distill_ms'], v['over_distill_ms_ci95'], '.2f')} over distill's default"
            )
    for r in rows if args.calibrate else []:
        print(
            f"calibration, batch {r['batch_size']}: the plain loop paired with itself, "
            f"{interval(r['calibration_ms'], r['calibration_ms_ci95'], '.2f')} ms/step (expected 0)"
        )


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(device="cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 4])
    p.add_argument("--steps", type=int, default=None, help="steps per fit (default: by batch size)")
    p.add_argument("--repeats", type=int, default=3, help="repeats, each in a fresh process")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="cpu: the process's CPU seconds")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the repeats' processes")
    p.add_argument("--lightning", action="store_true", help="also pair a bare LightningModule's fit")
    p.add_argument("--manual", action="store_true", help="also pair the bare module in manual optimisation")
    p.add_argument("--calibrate", action="store_true", help="also pair the plain loop with itself (expected 0)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="also pair distill fit with these extra CLI arguments (repeatable)",
    )
    p.add_argument("--data-dir", type=Path, default=FASHION_MNIST)
    p.add_argument("--child", help=argparse.SUPPRESS)  # sides: one repeat in this process
    args = p.parse_args(argv)
    if args.device != "cpu":
        p.error("--device cuda: per-step clocks would synchronise the device; use step_overhead.py on a GPU")
    reserved = {"distill", BARE, MANUAL, CALIBRATION}
    if any("=" not in v or v.split("=", 1)[0] in reserved | {""} for v in args.variant):
        p.error(f"--variant takes NAME=ARGS with a NAME other than {', '.join(sorted(reserved))}: got {args.variant}")
    args.variants = dict(v.split("=", 1) for v in args.variant)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        batch_size = args.batch_sizes[0]
        steps = args.steps or default_steps(batch_size)
        sides = args.child.split(",")
        result = {s: paired_fit(s, args.data_dir, batch_size, steps, args.clock, args.variants) for s in sides}
        print(json.dumps(result))
        return result
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            args.batch_sizes, args.steps, args.repeats = [4], 6, 1
            args.data_dir = write_fake_fashion_mnist(Path(tmp), n_train=64, n_test=16)
        rows = measure(args.data_dir, args)
    report(rows, args)
    write_json(f"step_pairs-cpu{'-lightning' if args.lightning or args.manual else ''}", args, {"results": rows})
    return {"results": rows}


if __name__ == "__main__":
    main()
