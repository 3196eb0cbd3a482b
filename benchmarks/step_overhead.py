"""The whole training step, input pipeline included: ``distill fit`` vs a hand-written PyTorch loop.

Both sides do the same work: Fashion-MNIST (uint8 in memory, the ``device`` pipeline), per-image
random crop with zero padding 2 + horizontal flip, normalisation, a frozen resnet20 teacher and a
resnet8 student, CE 0.1 + KD 0.9 (τ = 4), SGD (momentum 0.9, weight decay 5e-4) with a per-step LR
schedule. The ``distill`` side is the real CLI (``distill.cli.main(["fit", ...])``: logging every
``log_every_n_steps`` = 50, train metrics, checkpoint callbacks, preemption handler, run summary);
the plain side is a loop written by hand. Validation is off on both sides (``limit_val_batches=0``)
and the fits stop within the first epoch. Both sides run in the same memory layout: contiguous NCHW
(``distill``'s default), or channels_last with ``--channels-last`` (``model.channels_last``).

Every run is its own process, timed from just before the fit starts to its end, once for N₁ and
once for N₂ steps: ``(T(N₂) − T(N₁)) / (N₂ − N₁)`` is the time of one step with start-up, data
reading and the final checkpoint cancelled. Runs are interleaved (distill N₁, plain N₁, distill
N₂, plain N₂, for every batch size, per repeat), so both sides see the same machine load, and the
medians over the repeats are reported with their spread. The host overhead is
``distill − plain`` seconds per step: at batch 4 the compute is small and it is nearly all host
work. Each process reports its peak resident memory (``ru_maxrss``).

    python benchmarks/step_overhead.py [--device cuda [--compile]] [--channels-last] [--repeats 5] [--quick]

``--compile`` compiles every network in ``torch.compile``'s ``reduce-overhead`` mode (CUDA graphs)
on both sides. ``--quick`` runs a few steps on a fake, tiny Fashion-MNIST: a smoke test, not a
measurement.

``--profile`` instead runs the distill side once under cProfile (N₂ steps at the first batch size)
and prints where its step time goes, row by row (``PROFILE_ROWS``; cProfile slows Python code, not
kernels). The profile at batch 4 on the 2-core development CPU (README, Performance), in ms per
step: forward passes and losses 22.7 (of which the device-side step statistics 0.5 and the train
hits 0.2), backward 9.8, Lightning's loop and hook dispatch 4.9, SGD 1.1, the gradient-norm
finiteness record 1.1, crop + flip + normalise 0.7, batch fetch 0.6, logging steps 0.4, zero_grad
0.4, LR scheduler 0.25, callbacks' per-step hooks 0.1. The earlier 1.4-1.5x "overhead" at batch
128 was the plain loop's layout: its permuted gather gave a channels_last input, and the networks
ran 1.4x faster in channels_last on this CPU; the crop now returns contiguous NCHW.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, parser, print_table, write_fake_fashion_mnist, write_json  # noqa: E402

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TEACHER, STUDENT = "resnet20", "resnet8"
MEAN, STD, PAD = 0.2860, 0.3530, 2
SIDES = ("distill", "plain")


# ---- the two sides, each run in its own process -----------------------------------------------
def distill_fit(data_dir: Path, batch_size: int, steps: int, device: str, options: dict, logs: Path):
    from distill.cli import main

    args = [
        "fit",
        "--data=distill.data.FashionMNISTDataModule",
        f"--data.init_args.data_dir={data_dir}",
        "--data.init_args.pipeline=device",
        f"--data.init_args.batch_size={batch_size}",
        "--model=distill.methods.OfflineKD",
        f"--model.init_args.teacher={TEACHER}",
        f"--model.init_args.student={STUDENT}",
        "--model.init_args.ce_weight=0.1",
        '--model.init_args.terms=[{"class_path": "distill.losses.KDTerm"}]',
        f"--trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
        "--trainer.devices=1",
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={logs}",
        f"--trainer.logger.init_args.save_dir={logs}",
    ]
    if options["compile"]:
        args.append(f"--model.init_args.compile={options['compile']}")
    if options["channels_last"]:
        args.append("--model.init_args.channels_last=true")
    sys.argv = sys.argv[:1]  # LightningCLI reads args=..., not this process's own arguments
    main(args)


def random_crop_flip(images, generator):
    """Per image: zero-pad by ``PAD``, crop back at a uniform offset, flip with p = 0.5 (advanced
    indexing broadcast to ``(N, C, H, W)``, so the result is contiguous NCHW, as ``distill``'s batches)."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (PAD, PAD, PAD, PAD))
    top = torch.randint(0, 2 * PAD + 1, (n, 1, 1, 1), device=device, generator=generator)
    left = torch.randint(0, 2 * PAD + 1, (n, 1, 1, 1), device=device, generator=generator)
    flip = torch.rand(n, 1, 1, 1, device=device, generator=generator) < 0.5
    cols = torch.arange(w, device=device)
    cols = left + torch.where(flip, cols.flip(0), cols)
    rows = top + torch.arange(h, device=device)[:, None]
    batch, channel = torch.arange(n, device=device)[:, None, None, None], torch.arange(c, device=device)[:, None, None]
    return padded[batch, channel, rows, cols]


def plain_fit(data_dir: Path, batch_size: int, steps: int, device: str, options: dict):
    """A hand-written loop: the same data, augmentation, networks, losses, optimiser and schedule."""
    import torch
    import torch.nn.functional as F

    from distill.models import create_model

    def read(name: str, header: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(gzip.decompress((data_dir / name).read_bytes())), dtype=torch.uint8)[header:]

    torch.manual_seed(0)
    images = read("train-images-idx3-ubyte.gz", 16).view(-1, 1, 28, 28)
    labels = read("train-labels-idx1-ubyte.gz", 8).long()
    student = create_model(STUDENT, num_classes=10, in_chans=1).to(device).train()
    teacher = create_model(TEACHER, num_classes=10, in_chans=1).to(device).eval().requires_grad_(False)
    layout = torch.channels_last if options["channels_last"] else torch.contiguous_format
    student, teacher = student.to(memory_format=layout), teacher.to(memory_format=layout)
    run_student, run_teacher = student, teacher
    if options["compile"]:
        mode = options["compile"]
        run_student, run_teacher = torch.compile(student, mode=mode), torch.compile(teacher, mode=mode)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1 ** sum(step >= m for m in (150, 180)))
    generator = torch.Generator(device=device).manual_seed(0)
    step = 0
    while step < steps:
        order = torch.randperm(len(labels))
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            x, y = images[index], labels[index]
            if device == "cuda":  # pinned, so the copy is asynchronous (distill pins its batches too)
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = ((random_crop_flip(x, generator).float() / 255 - MEAN) / STD).contiguous(memory_format=layout)
            logits = run_student(x)
            with torch.no_grad():
                teacher_logits = run_teacher(x)
            log_p_s, log_p_t = F.log_softmax(logits / 4, 1), F.log_softmax(teacher_logits / 4, 1)
            kd = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * 16
            loss = 0.1 * F.cross_entropy(logits, y) + 0.9 * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == steps:
                break
    if device == "cuda":
        torch.cuda.synchronize()


def child(side: str, data_dir: Path, batch_size: int, steps: int, device: str, options: dict) -> dict:
    """Run one side in this process; its seconds from just before the fit to its end, and peak RSS."""
    importlib.import_module("distill.cli" if side == "distill" else "distill.models")  # imports are not timed

    with tempfile.TemporaryDirectory() as logs:
        wall, cpu = time.perf_counter(), time.process_time()
        if side == "distill":
            distill_fit(data_dir, batch_size, steps, device, options, Path(logs))
        else:
            plain_fit(data_dir, batch_size, steps, device, options)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# where the distill side's step time goes: (row, file suffix, function), cumulative time per step; a
# set of functions is summed over every file containing the path part (the callbacks' hooks)
PROFILE_ROWS = [
    ("forward passes and losses (training_step)", "distill/methods/base.py", "training_step"),
    ("  of which the step statistics (device-side sums)", "distill/methods/step_stats.py", "add"),
    ("  of which the train top-1/top-5 hits", "distill/methods/step_stats.py", "add_hits"),
    ("backward", "torch/autograd/__init__.py", "backward"),
    ("gradient-norm finiteness record (on_after_backward)", "distill/methods/base.py", "on_after_backward"),
    ("SGD update", "torch/optim/sgd.py", "sgd"),
    ("zero_grad", "torch/optim/optimizer.py", "zero_grad"),
    ("batch fetch (DataLoader)", "pytorch_lightning/loops/fetchers.py", "__next__"),
    ("crop + flip + normalise (on_after_batch_transfer)", "distill/data/tensor.py", "on_after_batch_transfer"),
    ("logging steps: finiteness read + log (on_train_batch_end)", "distill/methods/base.py", "on_train_batch_end"),
    ("LR scheduler", "pytorch_lightning/loops/training_epoch_loop.py", "update_lr_schedulers"),
    (
        "callbacks' per-step hooks",
        "/callbacks/",
        {
            "on_train_batch_start",
            "on_train_batch_end",
            "on_before_backward",
            "on_after_backward",
            "on_before_optimizer_step",
            "on_before_zero_grad",
        },
    ),
]
LOOP = ("pytorch_lightning/loops/training_epoch_loop.py", "advance")


def profile(data_dir: Path, batch_size: int, steps: int, device: str, options: dict) -> list[dict]:
    """The distill side under cProfile: milliseconds per step of every row of ``PROFILE_ROWS`` (cumulative,
    so a row includes what it calls) and of Lightning's loop around them. cProfile slows Python code,
    not kernels, so the host rows are inflated against the compute rows."""
    import cProfile
    import pstats

    importlib.import_module("distill.cli")
    with tempfile.TemporaryDirectory() as logs:
        profiler = cProfile.Profile()
        profiler.runcall(distill_fit, data_dir, batch_size, steps, device, options, Path(logs))
    stats = pstats.Stats(profiler).stats  # {(file, line, function): (calls, primitive, tottime, cumtime, callers)}

    def per_step_ms(where: str, function: str | set[str]) -> float:
        if isinstance(function, set):  # every callback's hooks, summed (they do not call each other)
            hooks = [v[3] for (file, _, name), v in stats.items() if where in file and name in function]
            return 1e3 * sum(hooks) / steps
        # the outermost entry of the function (an entry per definition line; nested ones are inside it)
        times = [v[3] for (file, _, name), v in stats.items() if file.endswith(where) and name == function]
        return 1e3 * max(times, default=0.0) / steps

    rows = [{"row": row, "ms_per_step": per_step_ms(suffix, function)} for row, suffix, function in PROFILE_ROWS]
    loop = per_step_ms(*LOOP)
    covered = sum(r["ms_per_step"] for r in rows if not r["row"].startswith(" "))
    rows.append({"row": "Lightning's loop and hooks outside the rows above", "ms_per_step": loop - covered})
    rows.append({"row": "the whole training-loop step", "ms_per_step": loop})
    return rows


def run_child(side: str, data_dir: Path, batch_size: int, steps: int, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--data-dir", str(data_dir)]
    command += ["--child-batch-size", str(batch_size), "--child-steps", str(steps), "--device", args.device]
    command += ["--compile"] if args.compile else []
    command += ["--channels-last"] if args.channels_last else []
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{side} (batch {batch_size}, {steps} steps) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the comparison ---------------------------------------------------------------------------
def default_steps(batch_size: int, device: str) -> tuple[int, int]:
    """N₁, N₂: N₂ − N₁ steps of a few seconds of plain-loop compute (on a 2-core CPU; on a GPU)."""
    if device == "cuda":
        return (200, 1200)
    return (20, 70) if batch_size > 32 else (100, 600)


def measure(data_dir: Path, args) -> list[dict]:
    steps = {b: tuple(args.steps) if args.steps else default_steps(b, args.device) for b in args.batch_sizes}
    runs = {(side, b, n): [] for side in SIDES for b in args.batch_sizes for n in steps[b]}
    for repeat in range(args.repeats):
        for b in args.batch_sizes:
            for n in steps[b]:
                for side in SIDES if repeat % 2 == 0 else reversed(SIDES):
                    runs[side, b, n].append(run_child(side, data_dir, b, n, args))
                    print(f"repeat {repeat}: {side} batch {b} {n} steps: {runs[side, b, n][-1]}", flush=True)
    key = f"{args.clock}_s"
    rows = []
    for b in args.batch_sizes:
        n1, n2 = steps[b]
        per_step = {
            side: [(long[key] - short[key]) / (n2 - n1) for short, long in zip(runs[side, b, n1], runs[side, b, n2])]
            for side in SIDES
        }
        ratios = [d / p for d, p in zip(per_step["distill"], per_step["plain"])]
        overhead_ms = [1e3 * (d - p) for d, p in zip(per_step["distill"], per_step["plain"])]
        rss = {side: max(r["peak_rss_mb"] for n in (n1, n2) for r in runs[side, b, n]) for side in SIDES}
        rows.append(
            {
                "batch_size": b,
                "steps": [n1, n2],
                "repeats": args.repeats,
                "distill_s_per_step": median(per_step["distill"]),
                "plain_s_per_step": median(per_step["plain"]),
                "ratio": median(ratios),
                "ratio_range": [min(ratios), max(ratios)],
                "host_overhead_ms": median(overhead_ms),
                "host_overhead_ms_range": [min(overhead_ms), max(overhead_ms)],
                "distill_peak_rss_mb": rss["distill"],
                "plain_peak_rss_mb": rss["plain"],
                "per_repeat": {"distill_s_per_step": per_step["distill"], "plain_s_per_step": per_step["plain"]},
            }
        )
    return rows


def print_profile(args, options: dict) -> dict:
    """Profile the distill side at the first batch size for N₂ steps (in this process); print and save it."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    batch_size = args.batch_sizes[0]
    steps = (tuple(args.steps) if args.steps else default_steps(batch_size, args.device))[1]
    rows = profile(args.data_dir, batch_size, steps, args.device, options)
    print_table(
        f"where distill's step time goes ({args.device}, batch {batch_size}, {steps} steps, under cProfile)",
        ["part of the step", "ms/step"],
        [[r["row"], f"{r['ms_per_step']:.2f}"] for r in rows],
    )
    write_json(f"step_profile-{args.device}", args, {"batch_size": batch_size, "steps": steps, "results": rows})
    return {"results": rows}


def spread(value: float, extremes: list[float], fmt: str) -> str:
    """``median (min–max)``."""
    return f"{value:{fmt}} ({extremes[0]:{fmt}}–{extremes[1]:{fmt}})"


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 4])
    p.add_argument("--steps", type=int, nargs=2, default=None, metavar=("N1", "N2"), help="default: by batch size")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats of every run")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed seconds; cpu: the process's CPU seconds (with --threads 1: robust to other load)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile mode reduce-overhead (CUDA graphs)")
    p.add_argument(
        "--channels-last", action="store_true", help="both sides in channels_last (distill: model.channels_last)"
    )
    p.add_argument("--data-dir", type=Path, default=FASHION_MNIST)
    p.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of both sides (default: torch's, one per core)"
    )
    p.add_argument("--profile", action="store_true", help="instead: where the distill side's step time goes (cProfile)")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)  # one run, in this process
    p.add_argument("--child-batch-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-steps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    options = {"compile": "reduce-overhead" if args.compile else None, "channels_last": args.channels_last}
    if args.child:
        result = child(args.child, args.data_dir, args.child_batch_size, args.child_steps, args.device, options)
        print(json.dumps(result))
        return result
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            args.batch_sizes, args.steps, args.repeats, args.threads = [4], [2, 4], 1, args.threads or 1
            args.data_dir = write_fake_fashion_mnist(Path(tmp), n_train=64, n_test=16)
        if args.profile:
            return print_profile(args, options)
        rows = measure(args.data_dir, args)
    print_table(
        f"distill fit vs a plain PyTorch loop, whole step ({args.device}{', compiled' if args.compile else ''}"
        f"{', channels_last' if args.channels_last else ', NCHW'}; "
        f"Fashion-MNIST, KD {TEACHER} -> {STUDENT}; median of {args.repeats} interleaved repeats, "
        "N₂ − N₁ steps)",
        [
            "batch",
            "distill s/step",
            "plain s/step",
            "ratio (range)",
            "host overhead ms/step (range)",
            "peak RSS MB distill / plain",
        ],
        [
            [
                r["batch_size"],
                f"{r['distill_s_per_step']:.4f}",
                f"{r['plain_s_per_step']:.4f}",
                spread(r["ratio"], r["ratio_range"], ".2f"),
                spread(r["host_overhead_ms"], r["host_overhead_ms_range"], ".1f"),
                f"{r['distill_peak_rss_mb']:.0f} / {r['plain_peak_rss_mb']:.0f}",
            ]
            for r in rows
        ],
    )
    variant = ("-compile" if args.compile else "") + ("-channels_last" if args.channels_last else "")
    write_json(f"step_overhead-{args.device}{variant}", args, {"results": rows})
    return {"results": rows}


if __name__ == "__main__":
    main()
