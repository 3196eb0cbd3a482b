#!/usr/bin/env python
"""Reproduce the CIFAR-100 table: teachers, students from scratch, pairs × methods × seeds
(docs/reproduction.md#reproducing-the-cifar-100-table).

    python scripts/reproduce_cifar100.py [--pairs P ...] [--methods M ...] [--seeds S ...] [--runs DIR]
                                         [--teacher-cache] [--dry-run | --slurm DIR] [-- extra distill fit arguments]

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
two pairs, MobileNetV2, is trained once). Every ``fit`` job passes ``--ckpt_path=last``: a job that
was interrupted (or requeued) resumes from its ``last.ckpt``, a finished one returns at once. Jobs
run one after the other here, then the table is written by :mod:`distill.tools.results` to
``<runs>/cifar100/results/``. ``--slurm DIR`` runs nothing: it writes the task lists
``DIR/teachers.txt``, ``DIR/caches.txt`` (with ``--teacher-cache``) and ``DIR/jobs.txt`` (one shell
command per line) and ``DIR/submit.sh``, which submits each as a job array that starts once the
previous one succeeded, and the table as a last job (``scripts/reproduce_cifar100.sbatch`` runs one
line per task).

``--teacher-cache``: every student and method job uses the device pipeline (``pipeline: device``,
whose batches are a pure function of the data seed and the step), and before the method jobs one
``distill cache-teacher`` pass per teacher and data seed writes the teacher's logits for the whole
schedule to ``<runs>/teacher_cache/cifar100/<teacher>/seed<d>``; every method job whose training
reads only teacher logits (:func:`distill.methods.kd.teacher_cache_refusals` on its method file:
KD, DKD, not FitNet, AT or CRD) reads them from there instead of running the teacher, with the same
result bit for bit. The data seed ``d`` is ``data.init_args.seed`` as the jobs set it (0 unless
given after ``--``): ``--seeds`` sets ``seed_everything``, the students' initialisation, which does
not change the teacher's batches, so one pass serves every seed. A cache pass costs about one
epoch of the teacher's forward passes per epoch of the schedule, once; the dry run prints how many
passes it saves.

GPU-hours, as a formula (no measured numbers here: time one epoch of each job on your GPU, e.g. with
``-- --trainer.max_epochs=1``, and read ``run_time_s`` in its ``summary.json``):

    GPU-hours ≈ E / 3600 · ( Σ_teachers t_T + S · Σ_students t_s + S · Σ_pairs Σ_methods t_(pair,m) )

with E = 240 epochs, S seeds and t the seconds one epoch takes on one GPU. Without a measurement, a
distillation epoch is about the student's epoch plus the teacher's forward pass (a rule of thumb: a
forward is roughly a third of a training step), t_(pair,m) ≈ t_s + t_T / 3, more for CRD (its
memory bank). The defaults (10 pairs, 5 methods, 3 seeds) make 6 teachers + 9 students × 3 seeds +
150 method runs = 183 jobs. ``--methods all`` adds the other methods without an initialisation phase
(SP, RKD, PKT, CRD+KD, CC, VID, NST, KDSVD, OFD, ReviewKD, DIST, and KD/DKD/DIST with logit
standardisation): KDSVD only on the five pairs of equal stage widths, ReviewKD with the official
scripts' per-pair weights; 6 + 27 + (10 × 18 + 5) × 3 = 588 jobs.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "lightning_configs"
SBATCH = Path(__file__).resolve().with_suffix(".sbatch")
ANCHOR_METHODS = ["kd", "fitnet", "at", "crd", "dkd"]  # the anchor table's columns (docs/reproduction.md#cifar-100)
# The benchmarks' other rows that need no initialisation phase; `--methods all` runs them too.
MORE_METHODS = ["sp", "rkd", "pkt", "crd_kd", "cc", "vid", "nst", "kdsvd", "ofd", "reviewkd", "dist"]
MORE_METHODS += ["kd_ls", "dkd_ls", "dist_ls", "ab", "ft", "fsp"]
# KDSVD relates singular vectors and FSP flows channel by channel: only pairs with equal stage widths.
EQUAL_WIDTHS = {"resnet56_resnet20", "resnet110_resnet32", "resnet32x4_resnet8x4", "wrn_40_2_wrn_16_2", "vgg13_vgg8"}
ONLY_ON = {"kdsvd": EQUAL_WIDTHS, "fsp": EQUAL_WIDTHS}
# The official ReviewKD scripts' per-pair loss weights (its default, 1, elsewhere).
OVERRIDES = {
    ("reviewkd", pair): [f"--model.init_args.terms.init_args.weight={weight}"]
    for pair, weight in {
        "resnet32x4_resnet8x4": 5.0,
        "wrn_40_2_wrn_16_2": 5.0,
        "wrn_40_2_wrn_40_1": 5.0,
        "resnet32x4_ShuffleV1": 5.0,
        "resnet32x4_ShuffleV2": 8.0,
        "resnet56_resnet20": 0.6,
    }.items()
}


@dataclass
class Job:
    name: str  # run name under <runs>, e.g. cifar100/kd/resnet56_resnet20/seed0
    configs: list[Path]
    overrides: list[str]
    store: Path | None = None  # set: a `distill cache-teacher` pass writing this store, not a fit

    def command(self, runs: Path, extra: list[str]) -> list[str]:
        args = [sys.executable, "-m", "distill.cli", "cache-teacher" if self.store else "fit"]
        for config in self.configs:
            args += ["--config", str(config)]
        if self.store:
            return args + ["--out", str(self.store), *self.overrides, *extra]
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


def import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def reads_only_teacher_logits(method: str) -> bool:
    """Whether ``methods/<method>.yaml`` over a pair (an ``OfflineKD``, unless the file names another
    class) trains from teacher logits alone, so a teacher cache can serve it."""
    from distill.methods.kd import OfflineKD, teacher_cache_refusals

    model = yaml.safe_load((CONFIGS / "methods" / f"{method}.yaml").read_text()).get("model") or {}
    cls = import_class(model.get("class_path", "distill.methods.OfflineKD"))
    terms = [import_class(term["class_path"]) for term in (model.get("init_args") or {}).get("terms") or []]
    return issubclass(cls, OfflineKD) and not teacher_cache_refusals(cls, [(t.name, t) for t in terms])


def data_seed(args: list[str]) -> str:
    """The data seed the arguments set (the last ``--data.init_args.seed=``), else the DataModule's
    default, 0 (the CIFAR-100 configs set none)."""
    seeds = [arg.split("=", 1)[1] for arg in args if arg.startswith("--data.init_args.seed=")]
    return seeds[-1] if seeds else "0"


def plan(
    pairs: list[str], methods: list[str], seeds: list[int], runs: Path, teacher_cache: bool = False, extra=()
) -> tuple[list[Job], list[Job], list[Job]]:
    """(teacher jobs, teacher cache passes, student and method jobs) in the order they run."""
    for method in methods:
        if not (CONFIGS / "methods" / f"{method}.yaml").is_file():
            known = ", ".join(sorted(p.stem for p in (CONFIGS / "methods").glob("*.yaml")))
            raise SystemExit(f"no method file lightning_configs/methods/{method}.yaml; known methods: {known}")
    device = ["--data.init_args.pipeline=device"] if teacher_cache else []
    networks = {pair: read_pair(pair) for pair in pairs}
    teachers = [
        Job(f"cifar100/supervised/{arch}", [supervised_config(arch)], [])
        for arch in dict.fromkeys(t for t, _ in networks.values())
        if not finished(teacher_run(runs, arch) / "version_0")
    ]
    jobs = [
        Job(f"cifar100/student/{arch}/seed{seed}", [supervised_config(arch)], [*device, f"--seed_everything={seed}"])
        for arch in dict.fromkeys(s for _, s in networks.values())
        for seed in seeds
    ]
    caches: dict[Path, Job] = {}  # one pass per store: per teacher and data seed
    cached = {method for method in methods if teacher_cache and reads_only_teacher_logits(method)}
    for pair, (teacher, _) in networks.items():
        weights = teacher_run(runs, teacher)
        pair_file = CONFIGS / "cifar100/pairs" / f"{pair}.yaml"
        for method in methods:
            if pair not in ONLY_ON.get(method, (pair,)):
                continue
            for seed in seeds:
                configs = [pair_file, CONFIGS / "methods" / f"{method}.yaml"]
                overrides = [f"--model.init_args.teacher_weights={weights}", *device, f"--seed_everything={seed}"]
                overrides += OVERRIDES.get((method, pair), [])
                if method in cached:
                    store = runs / "teacher_cache/cifar100" / teacher / f"seed{data_seed([*overrides, *extra])}"
                    caches.setdefault(store, Job(f"teacher_cache/cifar100/{teacher}", configs, list(overrides), store))
                    overrides.append(f"--model.init_args.teacher_cache={store}")
                jobs.append(Job(f"cifar100/{method}/{pair}/seed{seed}", configs, overrides))
    return teachers, list(caches.values()), jobs


def write_slurm(folder: Path, teachers: list[str], caches: list[str], jobs: list[str], runs: Path) -> Path:
    """Task lists and ``submit.sh`` (teachers array → caches array → jobs array → table); returns ``submit.sh``."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    cwd = shlex.quote(str(Path.cwd()))
    lines = [
        "#!/bin/bash",
        "# Submits the CIFAR-100 reproduction written by scripts/reproduce_cifar100.py.",
        "set -euo pipefail",
    ]
    after = ""
    for name, commands in (("teachers", teachers), ("caches", caches), ("jobs", jobs)):
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
        "--methods",
        nargs="+",
        default=ANCHOR_METHODS,
        help=f"method files, or 'all' for these and {' '.join(MORE_METHODS)} (default: {' '.join(ANCHOR_METHODS)})",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="save_dir of every run (default: runs)")
    parser.add_argument(
        "--teacher-cache",
        action="store_true",
        help="device pipeline; one teacher pass per teacher and data seed serves every logit-only method run",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    mode.add_argument("--slurm", type=Path, metavar="DIR", help="write SLURM task lists and submit.sh to DIR")
    parser.add_argument("extra", nargs="*", help="after --: arguments added to every distill fit")
    args = parser.parse_args(argv)
    runs = args.runs.resolve()
    methods = ANCHOR_METHODS + MORE_METHODS if args.methods == ["all"] else args.methods
    teachers, caches, jobs = plan(args.pairs, methods, args.seeds, runs, args.teacher_cache, args.extra)
    commands = [[shlex.join(job.command(runs, args.extra)) for job in group] for group in (teachers, caches, jobs)]
    print(f"{len(teachers)} teachers, then {len(jobs)} student and method runs", file=sys.stderr)
    if args.teacher_cache:
        served = sum(any(a.startswith("--model.init_args.teacher_cache=") for a in job.overrides) for job in jobs)
        print(
            f"teacher cache: {len(caches)} teacher passes serve {served} runs: {served - len(caches)} passes saved",
            file=sys.stderr,
        )
    if args.dry_run:
        print("\n".join(commands[0] + commands[1] + commands[2]))
    elif args.slurm:
        print(f"submit with: {write_slurm(args.slurm, *commands, runs)}", file=sys.stderr)
    else:
        import subprocess

        from distill.tools.results import build_table, collect, to_markdown, write_results

        for job in teachers + caches + jobs:
            print(f"[reproduce] {job.name}", file=sys.stderr, flush=True)
            subprocess.run(job.command(runs, args.extra), check=True)
        table = build_table(collect(runs / "cifar100"))
        write_results(table, runs / "cifar100/results", runs / "cifar100")
        print(to_markdown(table))


if __name__ == "__main__":
    main()
