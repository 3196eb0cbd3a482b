"""Efficacy study: does every paradigm (PWKD, SOKD, SSKD, KR) beat the student from scratch, KD, and
the control that isolates it? Fashion-MNIST, a resnet14 teacher trained on the whole training split,
resnet8 students on a small stratified fraction of it, several seeds.

    python benchmarks/efficacy.py [--data-dir DIR] [--seeds 0 1 2] [--jobs 2] [--rows kd sskd ...] [--quick]

Every run is an ordinary ``distill fit`` of the configs in ``lightning_configs/fashion_mnist/`` (the
command of every row is printed and saved), run under ``--runs`` (default
``runs/efficacy/<time>/<row>/seed<k>/``). Best epoch and checkpoint are chosen on a validation split
held out of the training split; the 10,000 test images are read once per run, by the study's last
step, which evaluates the last epoch's student. The table reports test top-1 as mean ± sample std
over seeds and, for every row, the paired per-seed difference to the student from scratch, to KD and
to the row's control with a 95 % Student-t interval (n − 1 degrees of freedom); a difference is
*resolved* when its interval excludes 0. Writes ``benchmarks/results/efficacy.{json,md}`` and
``efficacy_val_top1.png`` (mean held-out validation curves, ±1 std bands, stages shaded), and prints
the wall time, the CPU time and the machine's load average at the start and the end.

``--jobs 2`` (default) runs two fits at a time, one thread each: on 2 cores this is faster than one
fit on two threads, as these networks are too small for two threads to help much.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from functools import cache
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, parser, write_json  # noqa: E402

from distill.demo import init_worker  # noqa: E402
from distill.tools.runs import latest_version, read_metrics, series  # noqa: E402
from distill.tools.stats import PairedDifference, paired_difference  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "lightning_configs" / "fashion_mnist"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
TEACHERS = ("teacher", "slimmable_teacher")


@dataclass(frozen=True)
class Row:
    """One row of the study: a ``distill fit`` of ``configs`` (relative to ``lightning_configs/fashion_mnist``)."""

    name: str
    label: str
    configs: tuple[str, ...]
    teacher: str | None = "teacher"  # the run whose last checkpoint is the teacher; None: no teacher
    extra: tuple[str, ...] = ()
    control: str | None = None  # the row that isolates this row's paradigm
    panel: str = "methods"  # which plot the row's curve goes to


KD_FILES = ("pair.yaml", "../methods/kd.yaml")
KR_FILES = ("pair.yaml", "kr.yaml")
PWKD_FILES = (*KD_FILES, "pwkd.yaml")
ROWS = [
    Row("teacher", "teacher (resnet14, whole training split)", ("teacher.yaml",), None, panel="teachers"),
    Row("slimmable_teacher", "slimmable teacher (resnet14, 4 widths)", ("pwkd_teacher.yaml",), None, panel="teachers"),
    Row("student", "student from scratch", ("student.yaml",), None),
    Row("kd", "KD", KD_FILES),
    Row("dml", "DML", ("pair.yaml", "../methods/dml.yaml"), None),
    Row("sokd", "SOKD", ("pair.yaml", "sokd.yaml"), control="sokd_no_student_kl", panel="sokd"),
    Row(
        "sokd_no_student_kl",
        "SOKD, KBM student-KL weight 0",
        ("pair.yaml", "sokd.yaml", "sokd_no_student_kl.yaml"),
        panel="sokd",
    ),
    Row("sskd", "SSKD", ("pair.yaml", "sskd.yaml"), control="sskd_joint_ce", panel="sskd"),
    Row(
        "sskd_random_head",
        "SSKD, head phase from a random classifier",
        ("pair.yaml", "sskd.yaml", "../sskd/ablations/random_head.yaml"),
        control="sskd",
        panel="sskd",
    ),
    Row(
        "sskd_joint_ce",
        "SSKD joint CE (no decomposition)",
        ("pair.yaml", "sskd.yaml", "../sskd/ablations/joint_ce.yaml"),
        panel="sskd",
    ),
    Row("kr_kd", "KR:KD", KR_FILES, control="kr_init_only", panel="kr"),
    Row("kr_init_only", "KR:KD prior initialisation only (β = 0)", (*KR_FILES, "kr_init_only.yaml"), panel="kr"),
    Row(
        "kr_penalty_only",
        "KR:KD penalty only (random init)",
        (*KR_FILES, "../kr/ablations/no_prior_init.yaml"),
        control="kd",
        panel="kr",
    ),
    Row(
        "kr_random_prior",
        "KR:KD random prior (no aggregation)",
        (*KR_FILES, "../kr/ablations/random_prior.yaml"),
        panel="kr",
    ),
    Row("kr_beta_5e-3", "KR:KD β = 5e-3 (sweep)", KR_FILES, extra=("--model.init_args.beta=5e-3",), panel="kr"),
    Row("kr_beta_5e-1", "KR:KD β = 5e-1 (sweep)", KR_FILES, extra=("--model.init_args.beta=5e-1",), panel="kr"),
    Row("pwkd_kd", "PWKD:KD", PWKD_FILES, "slimmable_teacher", control="pwkd_whole_only", panel="pwkd"),
    Row(
        "pwkd_whole_only",
        "PWKD:KD whole only (same teacher and cyclic LR)",
        (*PWKD_FILES, "../pwkd/cifar100/ablations/whole_only.yaml"),
        "slimmable_teacher",
        panel="pwkd",
    ),
]
REFERENCE_ROWS = {"student", "kd"}  # shown in panels for reference: a panel of only these is not drawn
PANELS = {
    "methods": ("student", "kd", "dml", "sokd", "sskd", "kr_kd", "pwkd_kd"),
    "pwkd": ("kd", "pwkd_kd", "pwkd_whole_only"),
    "sskd": ("student", "sskd", "sskd_random_head", "sskd_joint_ce"),
    "sokd": ("kd", "sokd", "sokd_no_student_kl"),
    "kr": ("kd", "kr_kd", "kr_init_only", "kr_penalty_only", "kr_random_prior", "kr_beta_5e-3", "kr_beta_5e-1"),
}


@dataclass
class Job:
    row: Row
    seed: int | None  # None: a teacher (one run)
    args: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.row.name if self.seed is None else f"{self.row.name}/seed{self.seed}"


def fit_args(row: Row, seed: int | None, runs: Path, teacher_ckpt: Path | None, options) -> list[str]:
    """The ``distill fit`` arguments of one run (what a researcher types to rerun it)."""
    args = ["fit"]
    for config in row.configs:
        args += ["--config", os.path.relpath(os.path.normpath(CONFIGS / config))]
    args += [
        f"--data.init_args.data_dir={options.data_dir}",
        f"--trainer.logger.init_args.save_dir={runs}",
        f"--trainer.logger.init_args.name={row.name if seed is None else f'{row.name}/seed{seed}'}",
    ]
    if seed is not None:
        args += [f"--seed_everything={seed}", f"--data.init_args.seed={seed}"]
        if options.train_fraction is not None:
            args.append(f"--data.init_args.train_fraction={options.train_fraction}")
    if teacher_ckpt is not None:
        args.append(f"--model.init_args.teacher_weights={teacher_ckpt}")
    epochs = options.teacher_epochs if seed is None else options.epochs
    if epochs is not None:  # the configs' one cosine cycle follows (PWKD and SSKD replace it anyway)
        args += [f"--trainer.max_epochs={epochs}", f"--model.init_args.lr_schedule.init_args.cycle_epochs=[{epochs}]"]
    return args + list(row.extra) + list(options.trainer_args)


# ---- running -----------------------------------------------------------------------------------
@cache
def test_batches(data_dir: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 10,000 test images, normalised as in training, and their labels (read once per process)."""
    from distill.data import FashionMNISTDataModule

    dm = FashionMNISTDataModule(data_dir=data_dir, batch_size=1000, pipeline="device")
    dm.setup("test")
    return [dm.on_after_batch_transfer(batch, 0)[:2] for batch in dm.test_dataloader()]


@torch.no_grad()
def test_top1(checkpoint: Path, data_dir: str) -> float:
    """Top-1 (%) of the checkpoint's student (a slimmable teacher: its whole width) on the test split."""
    from distill.tools.export import load_network

    model = load_network(checkpoint).model
    correct = total = 0
    for images, targets in test_batches(data_dir):
        correct += int((model(images).argmax(1) == targets).sum())
        total += len(targets)
    return 100 * correct / total


def run_job(args: list[str], run_dir: Path, data_dir: str) -> dict:
    """One ``distill fit``, then the test top-1 of its last epoch; in a worker process."""
    from distill.cli import main as distill

    start = time.perf_counter()
    distill(args)
    seconds = time.perf_counter() - start
    version = latest_version(run_dir)
    return {
        "run": str(version),
        "seconds": seconds,
        "test_top1": test_top1(version / "checkpoints" / "last.ckpt", data_dir),
    }


class InProcess:
    """The executor interface, run synchronously in this process (``--jobs 1``)."""

    def __init__(self, threads: int):
        init_worker(threads)

    def submit(self, fn, *args) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as error:  # re-raised by future.result()
            future.set_exception(error)
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def executor(jobs: int):
    if jobs == 1:
        return InProcess(threads=torch.get_num_threads())
    return ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=init_worker, initargs=(1,))


def run_all(rows: list[Row], options) -> dict[str, dict]:
    """Teachers first, then every row × seed (seed by seed), each as soon as its teacher exists."""
    jobs = [Job(r, None) for r in rows if r.name in TEACHERS]
    jobs += [Job(r, s) for s in options.seeds for r in rows if r.name not in TEACHERS]
    done: dict[str, dict] = {}
    with executor(options.jobs) as pool:
        running = {}
        while jobs or running:
            for job in [j for j in jobs if j.row.teacher is None or j.row.teacher in done]:
                teacher = done[job.row.teacher]["run"] if job.row.teacher else None
                ckpt = Path(teacher) / "checkpoints" / "last.ckpt" if teacher else None
                job.args = fit_args(job.row, job.seed, options.runs, ckpt, options)
                running[pool.submit(run_job, job.args, options.runs / job.key, options.data_dir)] = job
                jobs.remove(job)
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                try:
                    result = future.result()
                except Exception as error:
                    raise RuntimeError(f"{job.key} failed: distill {' '.join(job.args)}") from error
                done[job.key] = {**result, "args": job.args}
                print(
                    f"[efficacy] {job.key}: test top-1 {result['test_top1']:.2f}% after {result['seconds']:.0f} s",
                    flush=True,
                )
    return done


# ---- analysis ----------------------------------------------------------------------------------
def row_results(row: Row, done: dict[str, dict], seeds: list[int]) -> dict:
    """Per-seed test top-1, held-out val top-1 (last epoch, best epoch) and run time of a row."""
    per_seed = {}
    for seed in seeds:
        result = done.get(f"{row.name}/seed{seed}")
        if result is None:
            continue
        metrics = read_metrics(result["run"])
        val = [100 * v for _, v in series(metrics, "val/top1")]
        best = [100 * v for _, v in series(metrics, "val/top1_best")]
        per_seed[seed] = {
            "test_top1": result["test_top1"],
            "val_last": val[-1],
            "val_best": best[-1] if best else max(val),
            "seconds": result["seconds"],
            "run": result["run"],
        }
    return per_seed


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else ""
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def difference(a: dict, b: dict | None) -> PairedDifference | None:
    if not b or len(set(a) & set(b)) < 2:
        return None
    return paired_difference({s: r["test_top1"] for s, r in a.items()}, {s: r["test_top1"] for s, r in b.items()})


def analyse(rows: list[Row], done: dict[str, dict], seeds: list[int]) -> list[dict]:
    """One record per row: per-seed numbers, summaries, and the paired differences."""
    results = {row.name: row_results(row, done, seeds) for row in rows if row.name not in TEACHERS}
    records = []
    for row in rows:
        if row.name in TEACHERS:
            if row.name in done:
                records.append(
                    {
                        "row": row.name,
                        "label": row.label,
                        "test_top1": done[row.name]["test_top1"],
                        "seconds": done[row.name]["seconds"],
                        "command": "distill " + " ".join(done[row.name]["args"]),
                    }
                )
            continue
        per_seed = results[row.name]
        if not per_seed:
            continue
        first = done[f"{row.name}/seed{min(per_seed)}"]["args"]
        record = {
            "row": row.name,
            "label": row.label,
            "n": len(per_seed),
            "per_seed": per_seed,
            "command": "distill " + " ".join(a.replace(f"seed{min(per_seed)}", "seed{seed}") for a in first),
        }
        for key in ("test_top1", "val_last", "val_best", "seconds"):
            values = [r[key] for r in per_seed.values()]
            record[f"{key}_mean"] = statistics.fmean(values)
            record[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        for name, other in (("student", "student"), ("kd", "kd"), ("control", row.control)):
            skip = other is None or other == row.name or (row.name, other) == ("student", "kd")  # KD's row has it
            diff = None if skip else difference(per_seed, results.get(other))
            record[f"vs_{name}"] = (
                None if diff is None else {**asdict(diff), "resolved": diff.resolved, "against": other}
            )
        records.append(record)
    return records


def format_difference(diff: dict | None) -> str:
    if diff is None:
        return ""
    text = f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}]"
    return f"**{text}**" if diff["resolved"] else text


def to_markdown(records: list[dict], n_test: int) -> str:
    labels = {r["row"]: r["label"] for r in records}
    lines = [
        "| row | n | test top-1 (%) | held-out val, last [best] (%) | Δ vs student | Δ vs KD | Δ vs control |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "n" not in r:
            lines.append(f"| {r['label']} | 1 | {r['test_top1']:.2f} | | | | |")
            continue
        per_seed = r["per_seed"].values()
        val = f"{mean_std([s['val_last'] for s in per_seed])} [{statistics.fmean(s['val_best'] for s in per_seed):.2f}]"
        control = r["vs_control"]
        control_text = f"{format_difference(control)} (vs {control['against']})" if control else ""
        lines.append(
            f"| {r['label']} | {r['n']} | {mean_std([s['test_top1'] for s in per_seed])} | {val} | "
            f"{format_difference(r['vs_student'])} | {format_difference(r['vs_kd'])} | {control_text} |"
        )
    lines += [
        "",
        f"Test top-1 of the last epoch's student on the {n_test:,} test images (one image = {100 / n_test:.2f} "
        "points), mean ± sample std over seeds. Δ: mean of the per-seed differences (points) with its 95 % "
        "Student-t interval (n − 1 degrees of freedom); **bold**: resolved (the interval excludes 0).",
        "",
        "Resolved: " + (", ".join(resolved_sentences(records, labels, True)) or "none") + ".",
        "",
        "Unresolved: " + (", ".join(resolved_sentences(records, labels, False)) or "none") + ".",
    ]
    return "\n".join(lines) + "\n"


def resolved_sentences(records: list[dict], labels: dict, resolved: bool) -> list[str]:
    out = []
    for r in records:
        for key in ("vs_student", "vs_kd", "vs_control"):
            diff = r.get(key)
            if diff is not None and diff["resolved"] == resolved:
                relation = (">" if diff["mean"] > 0 else "<") if resolved else "vs"
                out.append(f"{r['label']} {relation} {labels[diff['against']]} ({diff['mean']:+.2f})")
    return out


def chosen_beta(records: list[dict]) -> dict | None:
    """The KR β sweep's winner on the held-out validation split (last epoch, mean over seeds)."""
    sweep = [r for r in records if r["row"] == "kr_kd" or r["row"].startswith("kr_beta_")]
    return max(sweep, key=lambda r: r["val_last_mean"]) if sweep else None


PANEL_TITLES = {
    "methods": "every paradigm against the student and KD",
    "pwkd": "PWKD against its whole-only control",
    "sskd": "SSKD against joint CE (no decomposition)",
    "sokd": "SOKD against KBM student-KL weight 0",
    "kr": "KR: components and β sweep",
}


def plot(records: list[dict], path: Path) -> Path:
    """Mean held-out validation top-1 per epoch of every row, ±1 std bands, one panel per question."""
    from matplotlib.figure import Figure

    from distill.tools.plots import plot_mean_curve, shade_stages

    by_row = {r["row"]: r for r in records if "per_seed" in r}
    panels = {p: names for p, names in PANELS.items() if any(n in by_row for n in names if n not in REFERENCE_ROWS)}
    grid_rows = max(1, math.ceil(len(panels) / 2))
    fig = Figure(figsize=(13, 3.7 * grid_rows), layout="constrained")
    axes = fig.subplots(grid_rows, 2, squeeze=False).flatten()
    for ax, (panel, names) in zip(axes, panels.items()):
        starts, end = set(), 0
        for name in (n for n in names if n in by_row):
            runs = [SimpleNamespace(metrics=read_metrics(s["run"])) for s in by_row[name]["per_seed"].values()]
            row_starts, row_end = plot_mean_curve(ax, runs, by_row[name]["label"], band="std")
            starts, end = starts | row_starts, max(end, row_end)
        shade_stages(ax, sorted(starts), end)
        ax.set(xlabel="epoch", ylabel="held-out val top-1 (%)", title=PANEL_TITLES[panel])
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="lower right")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=DEBIAN_DIR, help=f"Fashion-MNIST files (default {DEBIAN_DIR})")
    p.add_argument("--runs", type=Path, default=None, help="where the runs go (default runs/efficacy/<time>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="fits at a time (one thread each when > 1)")
    p.add_argument("--rows", nargs="+", help="only these rows (and the teachers they need)")
    p.add_argument("--epochs", type=int, default=None, help="override the students' epochs")
    p.add_argument("--teacher-epochs", type=int, default=None, help="override the teachers' epochs")
    p.add_argument("--train-fraction", type=float, default=None, help="override the students' training fraction")
    args = p.parse_args(argv)
    args.trainer_args = []
    if args.quick:  # the machinery only: tiny fits, two seeds (the least a paired interval needs)
        args.seeds = args.seeds[:2] if len(args.seeds) >= 2 else [0, 1]
        args.epochs, args.teacher_epochs = args.epochs or 4, args.teacher_epochs or 1
        args.trainer_args = [
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=2",
            "--trainer.num_sanity_val_steps=0",
        ]
    args.runs = args.runs or Path("runs/efficacy") / time.strftime("%Y%m%d-%H%M%S")
    wanted = {r.name for r in ROWS if not args.rows or r.name in args.rows}
    needed = wanted | {r.teacher for r in ROWS if r.name in wanted and r.teacher}
    rows = [r for r in ROWS if r.name in needed]
    unknown = set(args.rows or ()) - {r.name for r in ROWS}
    if unknown:
        raise SystemExit(
            f"--rows: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(r.name for r in ROWS)}"
        )

    load_start, wall_start = os.getloadavg(), time.perf_counter()
    done = run_all(rows, args)
    wall = time.perf_counter() - wall_start
    load_end = os.getloadavg()
    cpu = sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )

    records = analyse(rows, done, args.seeds)
    table = to_markdown(records, sum(len(targets) for _, targets in test_batches(args.data_dir)))
    beta = chosen_beta(records)
    timing = (
        f"Wall time {wall / 60:.1f} min ({args.jobs} fits at a time), CPU time {cpu / 60:.1f} min; "
        f"load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in load_start)} at the start, "
        f"{'/'.join(f'{x:.1f}' for x in load_end)} at the end, on {os.cpu_count()} cores."
    )
    print("\n" + table)
    if beta:
        print(f"KR β sweep: best held-out val (last epoch) {beta['val_last_mean']:.2f}% with {beta['label']}")
    print(timing)
    quick = "-quick" if args.quick else ""
    out_json = args.out or RESULTS / f"efficacy{quick}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    (out_json.with_suffix(".md")).write_text(table + "\n" + timing + "\n")
    figure = plot(records, out_json.with_name(f"efficacy{quick}_val_top1.png"))
    print(f"wrote {out_json.with_suffix('.md')}, {figure}; runs under {args.runs}")
    payload = {
        "results": records,
        "wall_s": wall,
        "cpu_s": cpu,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "kr_beta_choice": beta and beta["row"],
    }
    write_json("efficacy", args, payload)
    return payload


if __name__ == "__main__":
    main()
