"""Framework overhead: one KD training step through ``distill`` vs the same step in a plain PyTorch loop.

``distill`` side: an :class:`~distill.methods.OfflineKD` module (CE 0.1 + KD 0.9, τ = 4) in a real
``Trainer.fit`` with the usual CSV logging, per-step LR schedule and train-accuracy metrics. Plain
side: copies of the same student and teacher, the same loss, ``torch.optim.SGD`` + ``LambdaLR``,
written by hand. Both read the same CIFAR-shaped random batches, already on the device (the input
pipeline is ``data.py``'s subject). A callback runs one plain step after every Lightning step, on
the same batch, so the two alternate step by step; a Lightning step is timed from the end of one
plain step to the start of the next (fetch, hooks, logging, LR step included).

    python benchmarks/overhead.py [--device cuda] [--steps 100] [--quick]
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clock, median, parser, print_table, write_json  # noqa: E402

from distill.losses import KDTerm  # noqa: E402
from distill.methods import OfflineKD  # noqa: E402

PAIRS = [("resnet32x4", "resnet8x4"), ("resnet56", "resnet20")]


def plain_kd_step(student, teacher, bf16: bool = False):
    """The hand-written loop's step (CE 0.1 + KD 0.9, τ = 4, SGD, per-step LambdaLR), optionally
    under bf16 autocast with the losses in fp32, as ``distill`` computes them."""
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    student.train()
    teacher.eval()
    device_type = next(student.parameters()).device.type

    def step(images, targets):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            logits = student(images).float()
            with torch.no_grad():
                teacher_logits = teacher(images).float()
        log_p_s, log_p_t = F.log_softmax(logits / 4, 1), F.log_softmax(teacher_logits / 4, 1)
        soft = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        loss = 0.1 * F.cross_entropy(logits, targets) + 0.9 * 16 * soft
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    return step


class Interleave(pl.Callback):
    """After every Lightning step, one plain step on the same batch; both timed after ``warmup`` steps."""

    def __init__(self, plain_step, device: str, warmup: int):
        self.plain_step, self.device, self.warmup = plain_step, device, warmup
        self.times: dict[str, list[float]] = {"distill": [], "plain": []}
        self.mark: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        measured = trainer.global_step > self.warmup
        start = clock(self.device)
        if measured and self.mark is not None:
            self.times["distill"].append(start - self.mark)
        self.plain_step(batch[0], batch[1])
        self.mark = clock(self.device)
        if measured:
            self.times["plain"].append(self.mark - start)


def measure(teacher: str, student: str, args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    module = OfflineKD(
        student=student, teacher=teacher, terms=[KDTerm()], ce_weight=0.1, num_classes=100, image_size=32
    )
    plain = plain_kd_step(copy.deepcopy(module.student).to(device), copy.deepcopy(module.teacher).to(device))
    batches = [
        (
            torch.randn(args.batch_size, 3, 32, 32, device=device),
            torch.randint(0, 100, (args.batch_size,), device=device),
            torch.arange(args.batch_size, device=device),
        )
        for _ in range(args.distinct_batches)
    ]
    interleave = Interleave(plain, args.device, args.warmup)
    with tempfile.TemporaryDirectory() as logs:
        trainer = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            max_steps=args.warmup + args.steps + 1,
            max_epochs=10**6,  # both, so Lightning counts the epoch before training
            logger=CSVLogger(logs),
            callbacks=[interleave],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, DataLoader(batches, batch_size=None))
    times = interleave.times
    return {
        "pair": f"{teacher}->{student}",
        "batch_size": args.batch_size,
        "steps": len(times["plain"]),
        "distill_median_s": median(times["distill"]),
        "plain_median_s": median(times["plain"]),
        "ratio": median(times["distill"]) / median(times["plain"]),
        "distill_mean_s": sum(times["distill"]) / len(times["distill"]),
        "plain_mean_s": sum(times["plain"]) / len(times["plain"]),
    }


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="measured steps per side and pair")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--distinct-batches", type=int, default=20, help="random batches cycled through (epochs)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.distinct_batches = 3, 1, 8, 2
    noise = "does not have many workers|smaller than the logging interval|no `val_dataloader`"
    warnings.filterwarnings("ignore", message=f".*({noise}).*")
    rows = [measure(teacher, student, args) for teacher, student in PAIRS]
    print_table(
        f"KD step, distill vs plain PyTorch ({args.device}, batch {args.batch_size}, "
        f"median of {args.steps} interleaved steps)",
        ["teacher -> student", "distill ms", "plain ms", "ratio"],
        [[r["pair"], 1e3 * r["distill_median_s"], 1e3 * r["plain_median_s"], r["ratio"]] for r in rows],
    )
    write_json("overhead", args, {"results": rows})
    return {"results": rows}


if __name__ == "__main__":
    main()
