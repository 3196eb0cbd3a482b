#!/usr/bin/env python
"""Reproduce the CIFAR-100 table of METHODS.md §1: teachers, students from scratch, pairs × methods × seeds.

    python scripts/reproduce_cifar100.py [--pairs P ...] [--methods M ...] [--seeds S ...] [--runs DIR]
                                         [--dry-run | --slurm DIR] [-- extra distill fit arguments]

Every job is an ordinary ``distill fit`` with its own run directory (``--runs``, default ``runs``):

1. the teacher of every pair, ``cifar100/supervised/<arch>.yaml`` into
   ``<runs>/cifar100/supervised/<arch>/version_0``, unless that run has finished
   (:func:`distill.run_dirs.is_finished`); seed 0, once per architecture. The pairs read the newest
   finished run of ``<runs>/cifar100/supervised/<arch>`` (a run directory named without its version);
2. every student from scratch, ``cifar100/supervised/<arch>.yaml`` into
   ``<runs>/cifar100/student/<arch>/seed<s>``, once per architecture and seed;
3. every pair with every method, ``cifar100/pairs/<pair>.yaml`` + ``methods/<m>.yaml`` into
   ``<runs>/cifar100/<m>/<pair>/seed<s>``, once per seed.

So there are ``teachers + students × seeds + pairs × methods × seeds`` jobs (a student shared by
two pairs, MobileNetV2, is trained once). Every job passes ``--ckpt_path=last``: a job that was
interrupted (or requeued) resumes from its ``last.ckpt``, a finished one returns at once. Jobs run one
after the other here, then the table is written by :mod:`distill.tools.results` to
``<runs>/cifar100/results/``. ``--slurm DIR`` runs nothing: it writes the task lists
``DIR/teachers.txt`` and ``DIR/jobs.txt`` (one shell command per line) and ``DIR/submit.sh``, which
submits the teachers as a job array, the other jobs as a second array that starts once every teacher
succeeded, and the table as a last job (``scripts/reproduce_cifar100.sbatch`` runs one line per task).

GPU-hours, as a formula (no measured numbers here: time one epoch of each job on your GPU, e.g. with
``-- --trainer.max_epochs=1``, and read ``run_time_s`` in its ``summary.json``):

    GPU-hours ≈ E / 3600 · ( Σ_teachers t_T + S · Σ_students t_s + S · Σ_pairs Σ_methods t_(pair,m) )

with E = 240 epochs, S seeds and t the seconds one epoch takes on one GPU. Without a measurement, a
distillation epoch is about the student's epoch plus the teacher's forward pass (a rule of thumb: a
forward is roughly a third of a training step), t_(pair,m) ≈ t_s + t_T / 3, more for CRD (its
memory bank). The defaults (10 pairs, 5 methods, 3 seeds) make 6 teachers + 9 students × 3 seeds +
150 method runs = 183 jobs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "lightning_configs"
SBATCH = Path(__file__).resolve().with_suffix(".sbatch")
ANCHOR_METHODS = ["kd", "fitnet", "at", "crd", "dkd"]  # the anchor table's columns (METHODS.md §1)


@dataclass
class Job:
    name: str  # run name under <runs>, e.g. cifar100/kd/resnet56_resnet20/seed0
    configs: list[Path]
    overrides: list[str]

    def command(self, runs: Path, extra: list[str]) -> list[str]:
        args = [sys.executable, "-m", "distill.cli", "fit"]
        for config in self.configs:
            args += ["--config", str(config)]
        return args + [
            f"--trainer.logger.init_args.save_dir={runs}",
            f"--trainer.logger.init_args.name={self.name}",
            "--trainer.logger.init_args.version=0",
            "--ckpt_path=last",
            *self.overrides,
            *extra,
        ]


def read_pair(name: str) -> tuple[str, str]:
    """(teacher, student) of ``lightning_configs/cifar100/pairs/<name>.yaml``."""
    path = CONFIGS / "cifar100/pairs" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise SystemExit(f"no pair file {path}; known pairs: {known}")
    args = (yaml.safe_load(path.read_text()).get("model") or {}).get("init_args") or {}
    if not args.get("teacher") or not args.get("student"):
        raise SystemExit(f"{path}: model.init_args needs 'teacher' and 'student'")
    return args["teacher"], args["student"]


def supervised_config(arch: str) -> Path:
    path = CONFIGS / "cifar100/supervised" / f"{arch}.yaml"
    if not path.is_file():
        raise SystemExit(f"no supervised config {path} for {arch}")
    return path


def teacher_run(runs: Path, arch: str) -> Path:
    """The teacher's run directory, without a version: ``teacher_weights`` takes its newest finished run."""
    return runs / "cifar100/supervised" / arch


def finished(run: Path) -> bool:
    """:func:`distill.run_dirs.is_finished`, imported (with torch) only when the run has a summary."""
    if not (run / "summary.json").is_file():
        return False
    from distill.run_dirs import is_finished

    return is_finished(run)


def plan(pairs: list[str], methods: list[str], seeds: list[int], runs: Path) -> tuple[list[Job], list[Job]]:
    """(teacher jobs, student and method jobs) in the order they run."""

    for method in methods:
        if not (CONFIGS / "methods" / f"{method}.yaml").is_file():
            known = ", ".join(sorted(p.stem for p in (CONFIGS / "methods").glob("*.yaml")))
            raise SystemExit(f"no method file lightning_configs/methods/{method}.yaml; known methods: {known}")
    networks = {pair: read_pair(pair) for pair in pairs}
    teachers = [
        Job(f"cifar100/supervised/{arch}", [supervised_config(arch)], [])
        for arch in dict.fromkeys(t for t, _ in networks.values())
        if not finished(teacher_run(runs, arch) / "version_0")
    ]
    jobs = [
        Job(f"cifar100/student/{arch}/seed{seed}", [supervised_config(arch)], [f"--seed_everything={seed}"])
        for arch in dict.fromkeys(s for _, s in networks.values())
        for seed in seeds
    ]
    for pair, (teacher, _) in networks.items():
        weights = teacher_run(runs, teacher)
        pair_file = CONFIGS / "cifar100/pairs" / f"{pair}.yaml"
        for method in methods:
            for seed in seeds:
                jobs.append(
                    Job(
                        f"cifar100/{method}/{pair}/seed{seed}",
                        [pair_file, CONFIGS / "methods" / f"{method}.yaml"],
                        [f"--model.init_args.teacher_weights={weights}", f"--seed_everything={seed}"],
                    )
                )
    return teachers, jobs


def write_slurm(folder: Path, teachers: list[str], jobs: list[str], runs: Path) -> Path:
    """Task lists and ``submit.sh`` (teachers array → jobs array → table); returns ``submit.sh``."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    cwd = shlex.quote(str(Path.cwd()))
    lines = [
        "#!/bin/bash",
        "# Submits the CIFAR-100 reproduction written by scripts/reproduce_cifar100.py.",
        "set -euo pipefail",
    ]
    after = ""
    for name, commands in (("teachers", teachers), ("jobs", jobs)):
        if not commands:
            continue
        tasks = folder / f"{name}.txt"
        tasks.write_text("".join(f"cd {cwd} && {command}\n" for command in commands))
        lines.append(
            f"{name}=$(sbatch --parsable{after} --job-name=distill-{name} --array=1-{len(commands)} "
            f"{shlex.quote(str(SBATCH))} {shlex.quote(str(tasks))})"
        )
        after = f" --dependency=afterok:${name}"
    table = shlex.join(
        [sys.executable, "-m", "distill.tools.results", str(runs / "cifar100"), "--out", str(runs / "cifar100/results")]
    )
    table = f"cd {cwd} && {table}"
    lines += [f"sbatch{after.replace('afterok', 'afterany')} --job-name=distill-table --wrap {shlex.quote(table)}", ""]
    submit = folder / "submit.sh"
    submit.write_text("\n".join(lines))
    submit.chmod(0o755)
    return submit


def main(argv: list[str] | None = None) -> None:
    pairs = sorted(p.stem for p in (CONFIGS / "cifar100/pairs").glob("*.yaml"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=pairs, help="pair files (stems) to run (default: all)")
    parser.add_argument(
        "--methods", nargs="+", default=ANCHOR_METHODS, help=f"method files (default: {' '.join(ANCHOR_METHODS)})"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="save_dir of every run (default: runs)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    mode.add_argument("--slurm", type=Path, metavar="DIR", help="write SLURM task lists and submit.sh to DIR")
    parser.add_argument("extra", nargs="*", help="after --: arguments added to every distill fit")
    args = parser.parse_args(argv)
    runs = args.runs.resolve()
    teachers, jobs = plan(args.pairs, args.methods, args.seeds, runs)
    commands = [[shlex.join(job.command(runs, args.extra)) for job in group] for group in (teachers, jobs)]
    print(f"{len(teachers)} teachers, then {len(jobs)} student and method runs", file=sys.stderr)
    if args.dry_run:
        print("\n".join(commands[0] + commands[1]))
    elif args.slurm:
        print(f"submit with: {write_slurm(args.slurm, *commands, runs)}", file=sys.stderr)
    else:
        import subprocess

        from distill.tools.results import build_table, collect, to_markdown, write_results

        for job in teachers + jobs:
            print(f"[reproduce] {job.name}", file=sys.stderr, flush=True)
            subprocess.run(job.command(runs, args.extra), check=True)
        table = build_table(collect(runs / "cifar100"))
        write_results(table, runs / "cifar100/results", runs / "cifar100")
        print(to_markdown(table))


if __name__ == "__main__":
    main()
