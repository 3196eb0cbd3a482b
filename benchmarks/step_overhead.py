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

    python benchmarks/step_overhead.py [--device cuda [--compile]] [--channels-last]
                                       [--same-process] [--lightning] [--repeats 5] [--quick]

``--same-process`` runs the fits of a repeat (every side, N₁ and N₂) in one process, one after the
other, alternating which side goes first, after an untimed warm-up fit of each side: whatever differs
between two processes (what they import, where their memory lands) then cancels, at the cost of the
per-side peak RSS. ``--lightning`` adds a third side, the plain loop's work as a bare LightningModule
under ``Trainer.fit`` (no logger, metrics, checkpoints or callbacks), which splits the overhead into
Lightning's own (bare − plain) and what ``distill`` adds on top of it (distill − bare).

On a CPU, ``step_pairs.py`` makes the same comparison step by step inside one process, which
cancels the machine's drifts that whole fits suffer from (the targets are read off it).

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
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, parser, print_table, run_json_child, write_fake_fashion_mnist, write_json  # noqa: E402

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TEACHER, STUDENT = "resnet20", "resnet8"
MEAN, STD, PAD = 0.2860, 0.3530, 2
SIDES = ("distill", "plain")
BARE = "lightning"  # with --lightning: the plain loop's work as a bare LightningModule
IMPORTS = {"distill": "distill.cli", BARE: "pytorch_lightning", "plain": "distill.models"}  # not timed


# ---- the two sides, each run in its own process -----------------------------------------------
def distill_fit(
    data_dir: Path, batch_size: int, steps: int, device: str, options: dict, logs: Path, extra: tuple[str, ...] = ()
):
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
    main([*args, *extra])


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


class PlainParts:
    """What the hand-written sides share: the data in memory, the networks, the optimiser and schedule."""

    def __init__(self, data_dir: Path, device: str, options: dict):
        import torch

        from distill.models import create_model

        def read(name: str, header: int) -> torch.Tensor:
            data = gzip.decompress((data_dir / name).read_bytes())
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)[header:]

        torch.manual_seed(0)
        self.device = device
        self.images = read("train-images-idx3-ubyte.gz", 16).view(-1, 1, 28, 28)
        self.labels = read("train-labels-idx1-ubyte.gz", 8).long()
        self.layout = torch.channels_last if options["channels_last"] else torch.contiguous_format
        self.student = create_model(STUDENT, num_classes=10, in_chans=1).to(device, memory_format=self.layout).train()
        teacher = create_model(TEACHER, num_classes=10, in_chans=1).to(device, memory_format=self.layout)
        self.teacher = teacher.eval().requires_grad_(False)
        self.run_student, self.run_teacher = self.student, self.teacher
        if options["compile"]:
            mode = options["compile"]
            self.run_student = torch.compile(self.student, mode=mode)
            self.run_teacher = torch.compile(self.teacher, mode=mode)
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 0.1 ** sum(step >= m for m in (150, 180))
        )
        self.generator = torch.Generator(device=device).manual_seed(0)

    def batches(self, batch_size: int):
        """Shuffled uint8 batches on the device, epoch after epoch."""
        import torch

        while True:
            order = torch.randperm(len(self.labels))
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                x, y = self.images[index], self.labels[index]
                if self.device == "cuda":  # pinned, so the copy is asynchronous (distill pins its batches too)
                    x, y = x.pin_memory(), y.pin_memory()
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def augment(self, x):
        """Crop + flip, scale to [0, 1] and normalise, in the networks' memory layout."""
        return ((random_crop_flip(x, self.generator).float() / 255 - MEAN) / STD).contiguous(memory_format=self.layout)

    def train_step(self, x, y) -> None:
        """One step of the plain loop on a uint8 batch: augment, losses, backward, SGD, LR schedule."""
        loss = self.loss(self.augment(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()

    def loss(self, x, y):
        """CE 0.1 + KD 0.9 (τ = 4) of the student against the frozen teacher."""
        import torch
        import torch.nn.functional as F

        logits = self.run_student(x)
        with torch.no_grad():
            teacher_logits = self.run_teacher(x)
        log_p_s, log_p_t = F.log_softmax(logits / 4, 1), F.log_softmax(teacher_logits / 4, 1)
        kd = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * 16
        return 0.1 * F.cross_entropy(logits, y) + 0.9 * kd


def plain_fit(data_dir: Path, batch_size: int, steps: int, device: str, options: dict):
    """A hand-written loop: the same data, augmentation, networks, losses, optimiser and schedule."""
    import torch

    parts = PlainParts(data_dir, device, options)
    for step, (x, y) in enumerate(parts.batches(batch_size)):
        if step == steps:
            break
        parts.train_step(x, y)
    if device == "cuda":
        torch.cuda.synchronize()


def lightning_fit(
    data_dir: Path,
    batch_size: int,
    steps: int,
    device: str,
    options: dict,
    callbacks: tuple = (),
    manual: bool = False,
):
    """The plain loop's work as a bare LightningModule under ``Trainer.fit`` (automatic optimisation, a
    per-step LR scheduler, no logger, metrics, checkpoints or callbacks of distill): Lightning's own cost.
    ``manual``: manual optimisation instead (the step, backward and scheduler in ``training_step``), the
    least of Lightning's loop a module can run."""
    import pytorch_lightning as pl
    import torch

    parts = PlainParts(data_dir, device, options)

    class Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            return parts.batches(batch_size)

    class Bare(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.student = parts.student
            self.automatic_optimization = not manual

        def train_dataloader(self):
            return torch.utils.data.DataLoader(Batches(), batch_size=None)

        def on_after_batch_transfer(self, batch, dataloader_idx):
            return parts.augment(batch[0]), batch[1]

        def training_step(self, batch, batch_idx):
            if not manual:
                return parts.loss(*batch)
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(parts.loss(*batch))
            optimizer.step()
            self.lr_schedulers().step()

        def configure_optimizers(self):
            return {"optimizer": parts.optimizer, "lr_scheduler": {"scheduler": parts.scheduler, "interval": "step"}}

    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )
    trainer.fit(Bare())
    if device == "cuda":
        torch.cuda.synchronize()


def timed_run(side: str, data_dir: Path, batch_size: int, steps: int, device: str, options: dict) -> dict:
    """One side's fit in this process: its seconds from just before the fit to its end, and the peak RSS
    of the process so far."""
    with tempfile.TemporaryDirectory() as logs:
        wall, cpu = time.perf_counter(), time.process_time()
        if side == "distill":
            distill_fit(data_dir, batch_size, steps, device, options, Path(logs))
        elif side == BARE:
            lightning_fit(data_dir, batch_size, steps, device, options)
        else:
            plain_fit(data_dir, batch_size, steps, device, options)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# --same-process: an untimed fit of every side first, so no timed run pays the process's first-use costs
WARMUP_STEPS = 2


def child(runs: list[tuple[str, int]], data_dir: Path, batch_size: int, device: str, options: dict) -> list[dict]:
    """Run ``(side, steps)`` after ``(side, steps)`` in this process; the imports are not timed, and where
    several sides share the process each first runs :data:`WARMUP_STEPS` steps untimed (the kernels'
    first-call set-up would otherwise fall on whichever timed run comes first)."""
    sides = list(dict.fromkeys(side for side, _ in runs))
    for side in sides:
        importlib.import_module(IMPORTS[side])
    for side in sides if len(sides) > 1 else []:
        timed_run(side, data_dir, batch_size, WARMUP_STEPS, device, options)
    return [timed_run(side, data_dir, batch_size, steps, device, options) for side, steps in runs]


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


def run_child(runs: list[tuple[str, int]], data_dir: Path, batch_size: int, args) -> list[dict]:
    """``runs`` (``(side, steps)``, in order) in one fresh process: their :func:`timed_run` results."""
    plan = ",".join(f"{side}:{steps}" for side, steps in runs)
    arguments = ["--child", plan, "--data-dir", str(data_dir), "--child-batch-size", str(batch_size)]
    arguments += ["--device", args.device] + (["--compile"] if args.compile else [])
    arguments += ["--channels-last"] if args.channels_last else []
    return run_json_child(str(Path(__file__).resolve()), arguments, args.threads, f"{plan} (batch {batch_size})")


# ---- the comparison ---------------------------------------------------------------------------
def default_steps(batch_size: int, device: str) -> tuple[int, int]:
    """N₁, N₂: N₂ − N₁ steps of a few seconds of plain-loop compute (on a 2-core CPU; on a GPU)."""
    if device == "cuda":
        return (200, 1200)
    return (20, 70) if batch_size > 32 else (100, 600)


def measure(data_dir: Path, args) -> list[dict]:
    steps = {b: tuple(args.steps) if args.steps else default_steps(b, args.device) for b in args.batch_sizes}
    sides = (*SIDES, BARE) if args.lightning else SIDES
    runs = {(side, b, n): [] for side in sides for b in args.batch_sizes for n in steps[b]}
    for repeat in range(args.repeats):
        for b in args.batch_sizes:
            plan = [(side, n) for n in steps[b] for side in (sides if repeat % 2 == 0 else sides[::-1])]
            if args.same_process:
                results = iter(run_child(plan, data_dir, b, args))
            else:  # a process per run, each started when the one before has ended
                results = (run_child([run], data_dir, b, args)[0] for run in plan)
            for (side, n), result in zip(plan, results):
                runs[side, b, n].append(result)
                print(f"repeat {repeat}: {side} batch {b} {n} steps: {result}", flush=True)
    key = f"{args.clock}_s"
    rows = []
    for b in args.batch_sizes:
        n1, n2 = steps[b]
        per_step = {
            side: [(long[key] - short[key]) / (n2 - n1) for short, long in zip(runs[side, b, n1], runs[side, b, n2])]
            for side in sides
        }
        ratios = [d / p for d, p in zip(per_step["distill"], per_step["plain"])]
        overhead_ms = [1e3 * (d - p) for d, p in zip(per_step["distill"], per_step["plain"])]
        # one process holds both sides with --same-process: its peak RSS is neither side's
        rss = {
            side: None if args.same_process else max(r["peak_rss_mb"] for n in (n1, n2) for r in runs[side, b, n])
            for side in SIDES
        }
        lightning = {}
        if args.lightning:  # Lightning's own cost, and what distill adds to it
            lightning = {
                f"{BARE}_s_per_step": median(per_step[BARE]),
                f"{BARE}_overhead_ms": median([1e3 * (t - p) for t, p in zip(per_step[BARE], per_step["plain"])]),
                f"distill_over_{BARE}_ms": median([1e3 * (d - t) for d, t in zip(per_step["distill"], per_step[BARE])]),
            }
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
                "per_repeat": {f"{side}_s_per_step": per_step[side] for side in sides},
                **lightning,
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
    p.add_argument(
        "--same-process",
        action="store_true",
        help="both sides of a repeat in one process, alternating (no per-side peak RSS)",
    )
    p.add_argument(
        "--lightning",
        action="store_true",
        help="a third side: the plain loop's work as a bare LightningModule (Lightning's own cost)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)  # side:steps,...: runs in this process
    p.add_argument("--child-batch-size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    options = {"compile": "reduce-overhead" if args.compile else None, "channels_last": args.channels_last}
    if args.child:
        runs = [(side, int(steps)) for side, steps in (run.split(":") for run in args.child.split(","))]
        results = child(runs, args.data_dir, args.child_batch_size, args.device, options)
        print(json.dumps(results))
        return results
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
        f"Fashion-MNIST, KD {TEACHER} -> {STUDENT}; median of {args.repeats} interleaved repeats"
        f"{', both sides in one process per repeat' if args.same_process else ''}, "
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
                "one process"
                if args.same_process
                else f"{r['distill_peak_rss_mb']:.0f} / {r['plain_peak_rss_mb']:.0f}",
            ]
            for r in rows
        ],
    )
    if args.lightning:
        print_table(
            "the overhead split: a bare LightningModule doing the plain loop's work (medians, ms/step)",
            ["batch", "bare Lightning s/step", "Lightning - plain", "distill - bare Lightning"],
            [
                [
                    r["batch_size"],
                    f"{r[f'{BARE}_s_per_step']:.4f}",
                    f"{r[f'{BARE}_overhead_ms']:.1f}",
                    f"{r[f'distill_over_{BARE}_ms']:.1f}",
                ]
                for r in rows
            ],
        )
    variant = ("-compile" if args.compile else "") + ("-channels_last" if args.channels_last else "")
    variant += ("-same_process" if args.same_process else "") + ("-lightning" if args.lightning else "")
    write_json(f"step_overhead-{args.device}{variant}", args, {"results": rows})
    return {"results": rows}


if __name__ == "__main__":
    main()
