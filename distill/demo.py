"""``make demo``: teacher, from-scratch student and every method on the embedded digits, on the CPU.

Every job is an ordinary ``distill fit`` of the configs in ``lightning_configs/digits/`` (the same
path a researcher takes), run under ``runs/demo/<time>/``, two at a time with one thread each
(``--jobs``; [chosen] on two cores this is faster than one fit on two threads: these networks are too
small for a second thread to help), each as soon as its teacher has finished, every job validated
every third epoch (``VALIDATION_EVERY``); the results tool reads
those runs back into ``results.md`` and plots (``python -m distill.tools.results``). The printed
table gives every network's last-epoch top-1 on the 359 test images (the digits' validation split is
their test split) and its difference to the student from scratch in points and in test images. Every
method runs at one seed (0); the student from scratch at three (``STUDENT_SEEDS``), whose mean is the
reference and whose range shows how far one seed moves a number here. A difference of less than one
image, or a number inside that range, is marked unresolved: one seed cannot resolve seed-to-seed
variation (the Fashion-MNIST study, ``benchmarks/efficacy.py``, does that). PWKD is shown next
to its whole-only control (same slimmable teacher and cyclic LR, whole width in every stage).
Numbers are whatever this machine measures; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch
import yaml

from .cli import main as distill
from .data import DigitsDataModule
from .tools.results import build_table, collect, write_results
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
    label: str = ""  # the network's name in the printed table
    control: str | None = None  # the job that isolates this one's paradigm, shown next to it


STUDENT_RUN = "student"
# [chosen] the student from scratch, the cheapest job, runs at three seeds: their spread is the demo's
# noise floor, and every method's one-seed number is compared with their mean and range
STUDENT_SEEDS = (0, 1, 2)


def student_run(seed: int) -> str:
    """The run name of the student from scratch at ``seed`` (seed 0, every other job's seed: ``student``)."""
    return STUDENT_RUN if seed == 0 else f"{STUDENT_RUN}_seed{seed}"


STUDENT_RUNS = tuple(student_run(seed) for seed in STUDENT_SEEDS)


def seeds_run(top1: dict[str, float]) -> list[int]:
    """The seeds of the student from scratch that ran (have a top-1 in ``top1``)."""
    return [seed for seed in STUDENT_SEEDS if student_run(seed) in top1]


JOBS = [
    Job(TEACHER_RUN, ["teacher.yaml"], needs_teacher=False, label="teacher (resnet20)"),
    *(
        Job(student_run(seed), ["student.yaml"], needs_teacher=False, extra=[f"--seed_everything={seed}"])
        for seed in STUDENT_SEEDS
    ),
    Job("kd", ["pair.yaml", "../methods/kd.yaml"], label="KD"),
    Job("dml", ["pair.yaml", "../methods/dml.yaml"], needs_teacher=False, label="DML"),
    Job("sskd", ["pair.yaml", "sskd.yaml"], label="SSKD"),
    Job("sokd", ["pair.yaml", "sokd.yaml"], label="SOKD"),
    Job("kr", ["pair.yaml", "kr.yaml"], label="KR:KD"),
    Job("pwkd_teacher", ["pwkd_teacher.yaml"], needs_teacher=False, label="slimmable teacher (resnet20)"),
    Job("pwkd", ["pair.yaml", "pwkd.yaml"], teacher_job="pwkd_teacher", label="PWKD:KD", control="pwkd_whole_only"),
    Job(
        "pwkd_whole_only",
        ["pair.yaml", "pwkd.yaml", "../pwkd/cifar100/ablations/whole_only.yaml"],
        teacher_job="pwkd_teacher",
        label="PWKD:KD whole only (control)",
    ),
]
TEACHERS = (TEACHER_RUN, "pwkd_teacher")
# [chosen] every job validates every third epoch (the last one included: 15, 6 and 60 epochs): with 5
# training steps an epoch, validating the 359 test images with student and teacher every epoch took
# most of a student's fit
VALIDATION_EVERY = 3
MIN_EPOCHS = 4  # SSKD's three stages and head, PWKD's four widths: one epoch each at least
# [chosen] workers are forked where that is the platform's default (Linux): they start with distill
# already imported, about 10 s sooner on two cores; elsewhere spawned (macOS: fork is unsafe there)
POOL_START = "fork" if sys.platform == "linux" else "spawn"
# [chosen] which ready jobs start first: the teachers (other jobs wait for them), then the longest
# fits (SOKD trains the student and the KBM, DML two students), so the two lanes end together
START_FIRST = (*TEACHERS, "sokd", "dml")


def start_order(job: Job) -> int:
    return START_FIRST.index(job.name) if job.name in START_FIRST else len(START_FIRST)


def init_worker(threads: int | None) -> None:
    """A job process: ``threads`` torch threads (``None``: torch's default) and the demo's quiet output."""
    if threads is not None:
        torch.set_num_threads(threads)
    quiet()


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
    if epochs is None:  # a smoke run (--epochs) validates every epoch
        args.append(f"--trainer.check_val_every_n_epoch={VALIDATION_EVERY}")
    start = time.perf_counter()
    distill(args + job.extra)
    return latest_version(save_dir / job.name), time.perf_counter() - start


def run_jobs(jobs: list[Job], save_dir: Path, epochs: int | None, parallel: int):
    """Run ``jobs``, ``parallel`` at a time in fresh processes, each once its teacher's run has finished;
    yield ``(job, run directory, seconds)`` as they finish."""
    pending, ckpts = list(jobs), {}
    running: dict[Future, Job] = {}
    threads = 1 if parallel > 1 else None
    with ProcessPoolExecutor(
        parallel, mp_context=get_context(POOL_START), initializer=init_worker, initargs=(threads,)
    ) as pool:
        while pending or running:
            ready = [j for j in pending if not j.needs_teacher or j.teacher_job in ckpts]
            ready.sort(key=start_order)
            for job in ready[: parallel - len(running)]:
                pending.remove(job)
                teacher = ckpts.get(job.teacher_job)
                running[pool.submit(run_job, job, save_dir, teacher, epochs)] = job
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                version_dir, seconds = future.result()
                ckpts[job.name] = version_dir / "checkpoints" / "last.ckpt"
                yield job, version_dir, seconds


def quiet() -> None:
    """Keep the demo's output to its own lines: Lightning's banners and known warnings go."""
    warnings.filterwarnings(
        "ignore",
        message=".*(does not have many workers|args parameter is intended|LeafSpec"
        "|smaller than the logging interval|module\\(s\\) in eval mode).*",
    )
    for name in ("pytorch_lightning", "lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def students_data() -> DigitsDataModule:
    """The students' DataModule as ``student_data.yaml`` configures it, set up."""
    data = DigitsDataModule(**yaml.safe_load((CONFIGS / "student_data.yaml").read_text())["init_args"])
    data.setup("fit")
    return data


def image_count(points: float, n_test: int) -> int:
    """The number of test images a difference of ``points`` stands for (rounded)."""
    return round(points * n_test / 100)


def in_images(points: float, n_test: int) -> str:
    """A difference in points, with the number of test images it stands for; under one image: unresolved."""
    images = image_count(points, n_test)
    if images == 0:  # a mean equal to a top-1 up to rounding prints +0.00, not -0.00
        return f"{round(points, 2) + 0.0:+.2f} (< 1 image: unresolved)"
    return f"{points:+.2f} ({images:+d} image{'s' if abs(images) > 1 else ''})"


def versus_students(top1: float, students: list[float], n_test: int) -> str:
    """``top1`` against the students from scratch: the difference to their mean, in points and test
    images; unresolved under one image or inside the range of their seeds."""
    points = top1 - statistics.mean(students)
    text = in_images(points, n_test)
    if len(students) > 1 and min(students) <= top1 <= max(students) and image_count(points, n_test):
        text = text[:-1] + ": inside the from-scratch seeds' range, unresolved)"
    return text


def demo_table(top1: dict[str, float], n_test: int) -> str:
    """Markdown: every job's test top-1 (%) and its difference to the student from scratch (the mean of
    its seeds; and, for a job with a control, to the control), in points and test images."""
    seeds = seeds_run(top1)
    students = [top1[student_run(seed)] for seed in seeds]
    lines = ["| network | test top-1 (%) | Δ vs student from scratch | Δ vs its control |", "|---|---|---|---|"]
    for job in JOBS:
        if job.name == STUDENT_RUN and students:
            spread = f" ({min(students):.2f}–{max(students):.2f})" if len(students) > 1 else ""
            lines.append(
                f"| student from scratch (resnet8), seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"
                f" | {statistics.mean(students):.2f}{spread} |  |  |"
            )
        if job.name in STUDENT_RUNS:
            continue
        if job.name not in top1:
            continue
        versus_student = (
            "" if job.name in TEACHERS or not students else versus_students(top1[job.name], students, n_test)
        )
        versus_control = in_images(top1[job.name] - top1[job.control], n_test) if job.control in top1 else ""
        lines.append(f"| {job.label} | {top1[job.name]:.2f} | {versus_student} | {versus_control} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="where the runs go (default: runs/demo)")
    parser.add_argument("--epochs", type=int, default=None, help="override every job's epochs (smoke runs)")
    parser.add_argument("--only", nargs="*", help="run only these jobs (the teacher always runs when needed)")
    parser.add_argument("--jobs", type=int, default=2, help="fits at a time, one thread each when > 1 (default 2)")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < MIN_EPOCHS:
        parser.error(
            f"--epochs {args.epochs}: expected at least {MIN_EPOCHS}, one for each of SSKD's and PWKD's stages"
        )
    quiet()
    save_dir = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    wanted = [j for j in JOBS if not args.only or j.name in args.only]
    jobs = [j for j in JOBS if j in wanted or any(w.needs_teacher and w.teacher_job == j.name for w in wanted)]
    top1 = {}
    start = time.perf_counter()
    for job, version_dir, seconds in run_jobs(jobs, save_dir, args.epochs, max(1, args.jobs)):
        top1[job.name] = summary(version_dir)["last"]
        print(f"[demo] {job.name}: test top-1 {top1[job.name]:.2f}% after {seconds:.0f} s", flush=True)
    written = write_results(build_table(collect(save_dir)), save_dir, root=save_dir)
    data = students_data()
    n_test = len(data.test_set)
    seeds = seeds_run(top1)
    students = f" (the student from scratch: seeds {', '.join(map(str, seeds))})" if len(seeds) > 1 else ""
    print(
        f"\nDigits (scikit-learn): resnet20 teachers on the 1,438 training images, resnet8 students on "
        f"{len(data.train_set)} of them ({data.train_fraction:.0%}), seed 0{students}. Top-1 of the last epoch "
        f"on the {n_test} test images (one image = {100 / n_test:.2f} points).\n"
    )
    print(demo_table(top1, n_test))
    print(
        f"All jobs: {time.perf_counter() - start:.0f} s. Runs and checkpoints: {save_dir}/; table and plots: "
        + ", ".join(p.name for p in written)
    )


if __name__ == "__main__":
    main()
