"""PWKD teacher cost per width: forward of the slimmable teacher at each width vs the plain network.

The teacher runs as in distillation (eval mode, no autograd) on CIFAR-shaped random batches. The
baseline is the ordinary, unconverted network at full width; every width of the slimmable copy
(``distill.models.slimmable``, same weights) is timed in the same round, rounds repeated and
interleaved. ``ideal`` is the share of multiply-adds a width keeps, about width².

    python benchmarks/pwkd_width.py [--device cuda] [--repeats 50] [--quick]
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clock, median, parser, print_table, write_json  # noqa: E402

from distill.models import create_model  # noqa: E402
from distill.models.slimmable import DEFAULT_WIDTHS, make_slimmable, set_width  # noqa: E402

TEACHERS = ["resnet32x4", "wrn_40_2", "resnet56"]


@torch.no_grad()
def measure(name: str, args) -> list[dict]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    plain = create_model(name, num_classes=100).to(device).eval()
    slim = make_slimmable(copy.deepcopy(plain)).to(device).eval()
    images = torch.randn(args.batch_size, 3, 32, 32, device=device)

    def forward(width: float | None):
        if width is None:
            plain(images)
        else:
            set_width(slim, width)
            slim(images)

    configs = [None, *DEFAULT_WIDTHS]
    seconds: dict = {c: [] for c in configs}
    for round_ in range(args.warmup + args.repeats):
        for config in configs:
            start = clock(device)
            forward(config)
            if round_ >= args.warmup:
                seconds[config].append(clock(device) - start)
    base = median(seconds[None])
    return [
        {
            "teacher": name,
            "width": "plain" if c is None else c,
            "median_ms": 1e3 * median(s),
            "ratio": median(s) / base,
            "ideal": 1.0 if c is None else c * c,
        }
        for c, s in seconds.items()
    ]


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20, help="timed rounds (every width once per round)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.batch_size = 2, 1, 4
    rows = [row for name in TEACHERS for row in measure(name, args)]
    print_table(
        f"Teacher forward per width vs the plain network ({args.device}, batch {args.batch_size}, "
        f"median of {args.repeats})",
        ["teacher", "width", "ms", "ratio", "ideal (w^2)"],
        [[r["teacher"], r["width"], r["median_ms"], r["ratio"], r["ideal"]] for r in rows],
    )
    write_json("pwkd_width", args, {"results": rows})
    return {"results": rows}


if __name__ == "__main__":
    main()
