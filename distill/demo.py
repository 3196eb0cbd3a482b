"""``make demo``: teacher, from-scratch student and every method on the embedded digits, on the CPU.

Every job is an ordinary ``distill fit`` of the configs in ``lightning_configs/digits/`` (the same
path a researcher takes), run one after the other under ``runs/demo/<time>/``; the table and plots at
the end come from the results tool reading those runs back (``python -m distill.tools.results``).
Numbers are whatever this machine measures; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .cli import main as distill
from .tools.results import build_table, collect, to_markdown, write_results
from .tools.runs import latest_version, summary

CONFIGS = Path(__file__).resolve().parent.parent / "lightning_configs" / "digits"
TEACHER_RUN = "teacher"


@dataclass
class Job:
    name: str
    configs: list[str]
    needs_teacher: bool = True
    extra: list[str] = field(default_factory=list)
    teacher_job: str = TEACHER_RUN  # the run whose last checkpoint is this job's teacher


JOBS = [
    Job(TEACHER_RUN, ["teacher.yaml"], needs_teacher=False),
    Job("student", ["student.yaml"], needs_teacher=False),
    Job("kd", ["pair.yaml", "../methods/kd.yaml"]),
    Job("dml", ["pair.yaml", "../methods/dml.yaml"], needs_teacher=False),
    Job("sskd", ["pair.yaml", "sskd.yaml"]),
    Job("sokd", ["pair.yaml", "sokd.yaml"]),
    Job("kr", ["pair.yaml", "kr.yaml"]),
    Job("pwkd_teacher", ["pwkd_teacher.yaml"], needs_teacher=False),
    Job("pwkd", ["pair.yaml", "pwkd.yaml"], teacher_job="pwkd_teacher"),
]


def run_job(job: Job, save_dir: Path, teacher_ckpt: Path | None, epochs: int | None) -> tuple[Path, float]:
    args = ["fit"]
    for config in job.configs:
        args += ["--config", str(CONFIGS / config)]
    args += [
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.logger.init_args.name={job.name}",
    ]
    if job.needs_teacher:
        args.append(f"--model.init_args.teacher_weights={teacher_ckpt}")
    if epochs is not None:
        args.append(f"--trainer.max_epochs={epochs}")
    start = time.perf_counter()
    distill(args + job.extra)
    return latest_version(save_dir / job.name), time.perf_counter() - start


def quiet() -> None:
    """Keep the demo's output to its own lines: Lightning's banners and known warnings go."""
    warnings.filterwarnings(
        "ignore",
        message=".*(does not have many workers|args parameter is intended|LeafSpec"
        "|smaller than the logging interval).*",
    )
    for name in ("pytorch_lightning", "lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="where the runs go (default: runs/demo)")
    parser.add_argument("--epochs", type=int, default=None, help="override every job's epochs (smoke runs)")
    parser.add_argument("--only", nargs="*", help="run only these jobs (the teacher always runs when needed)")
    args = parser.parse_args(argv)
    quiet()
    save_dir = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    wanted = [j for j in JOBS if not args.only or j.name in args.only]
    jobs = [j for j in JOBS if j in wanted or any(w.needs_teacher and w.teacher_job == j.name for w in wanted)]
    ckpts = {}
    for job in jobs:
        version_dir, seconds = run_job(job, save_dir, ckpts.get(job.teacher_job), args.epochs)
        ckpts[job.name] = version_dir / "checkpoints" / "last.ckpt"
        print(f"[demo] {job.name}: val top-1 {summary(version_dir)['last']:.2f}% after {seconds:.0f} s", flush=True)
    table = build_table(collect(save_dir))
    written = write_results(table, save_dir, root=save_dir)
    print("\nDigits (scikit-learn): resnet20 teachers on the 1,438 training images, resnet8 students on 10%")
    print("of them; top-1 on the 359 test images.\n")
    print(to_markdown(table))
    print(f"Runs and checkpoints: {save_dir}/; table and plots: " + ", ".join(p.name for p in written))


if __name__ == "__main__":
    main()
