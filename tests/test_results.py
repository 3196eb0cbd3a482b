"""The results tool: runs identified from their configs, mean ± std over seeds, CSV, plots."""

import csv
import io
import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import CONFIGS, FAST

from distill.cli import main as distill
from distill.methods.card import method_class
from distill.tools import results
from distill.tools.plots import val_top1_figure
from distill.tools.runs import read_metrics, series, stage_starts

DATA = {"class_path": "distill.data.CIFAR100DataModule", "init_args": {"batch_size": 64}}
KD = {"class_path": "distill.losses.KDTerm", "init_args": {"weight": 0.9, "temperature": 4.0}}
CRD = {"class_path": "distill.losses.CRDTerm", "init_args": {"weight": 0.8}}


def write_run(
    path, model: dict, val_top1: list, seed: int = 0, max_epochs: int | None = None, extra=None, seconds=None
):
    """A run directory as ``distill fit`` leaves it: ``config.yaml``, ``metrics.csv`` (a train row with
    the LR and a val row per epoch; a repeated epoch is a resumed run) and optionally ``summary.json``."""
    path.mkdir(parents=True)
    config = {
        "seed_everything": seed,
        "trainer": {"max_epochs": max_epochs or len(set(e for e, _ in val_top1))},
        "model": model,
        "data": DATA,
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    keys = ["epoch", "step", "lr_step", "val/top1", *sorted({k for extras in (extra or {}).values() for k in extras})]
    with open(path / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, keys)
        writer.writeheader()
        for epoch, value in val_top1:
            writer.writerow({"epoch": epoch, "step": epoch, "lr_step": 0.05 / (1 + epoch)})
            writer.writerow({"epoch": epoch, "step": epoch, "val/top1": value, **(extra or {}).get(epoch, {})})
    if seconds is not None:
        (path / "summary.json").write_text(json.dumps({"run_time_s": seconds}))


def offline_kd(terms, cls="distill.methods.OfflineKD"):
    return {"class_path": cls, "init_args": {"teacher": "resnet56", "student": "resnet20", "terms": terms}}


def supervised(arch):
    return {"class_path": "distill.methods.Supervised", "init_args": {"model": arch}}


def write_fake_runs(root):
    """resnet56 → resnet20: teacher, student (unfinished), KD × 2 seeds (seed 1 resumed mid-run, seed 0
    re-run for one epoch), PWKD over KD × 2 seeds with a ``stage`` column (stage 1 from epoch 2)."""
    write_run(root / "teacher", supervised("resnet56"), [(0, 0.75), (1, 0.76)])
    write_run(root / "student", supervised("resnet20"), [(0, 0.61), (1, 0.60)], max_epochs=3)
    write_run(root / "kd/version_0", offline_kd([KD]), [(0, 0.60), (1, 0.70), (2, 0.68)], seed=0, seconds=3600)
    write_run(root / "kd/version_1", offline_kd([KD]), [(0, 0.10)], seed=0, max_epochs=3)  # an aborted re-run
    write_run(
        root / "kd/version_2", offline_kd([KD]), [(0, 0.55), (1, 0.50), (1, 0.65), (2, 0.66)], seed=1, seconds=5400
    )
    stages = {e: {"stage": s} for e, s in enumerate([0, 0, 1, 1])}
    pwkd = offline_kd([KD], cls="distill.methods.PWKD")
    write_run(root / "pwkd/a", pwkd, [(0, 0.50), (1, 0.60), (2, 0.70), (3, 0.72)], seed=0, extra=stages)
    write_run(root / "pwkd/b", pwkd, [(0, 0.50), (1, 0.62), (2, 0.69), (3, 0.74)], seed=1, extra=stages)
    return root


def test_table_cells_are_mean_std_over_seeds_with_best(tmp_path):
    table = results.build_table(results.collect(write_fake_runs(tmp_path)))
    row = ("cifar100", "resnet56", "resnet20")
    assert table.rows == [row]
    assert table.columns["cifar100"] == ["teacher", "student", "kd", "pwkd:kd"]
    cells = {c: results.format_accuracy(table.cells[row, c]) for c in table.columns["cifar100"]}
    # kd: last 68 and 66 (seed 1's repeated epoch 1 keeps its last value), best 70 and 66; the aborted
    # one-epoch re-run of seed 0 is dropped. stdev(68, 66) = sqrt(2) = 1.41.
    assert cells == {
        "teacher": "76.00 [76.00]",
        "student": "60.00 [61.00]*",  # 2 of 3 epochs: unfinished
        "kd": "67.00 ± 1.41 [68.00]",
        "pwkd:kd": "73.00 ± 1.41 [73.00]",
    }
    assert [r.seed for r in table.cells[row, "kd"].runs] == [0, 1]
    assert results.format_time(table.cells[row, "kd"]) == "75 min ×2"
    assert results.format_time(table.cells[row, "pwkd:kd"]) == "n/a ×2"
    markdown = results.to_markdown(table)
    assert "| teacher → student | teacher | student | kd | pwkd:kd |" in markdown
    assert (
        "| resnet56 → resnet20 | 76.00 [76.00] | 60.00 [61.00]* | 67.00 ± 1.41 [68.00] | 73.00 ± 1.41 [73.00] |"
        in markdown
    )


def test_every_number_says_which_split_it_is_on(tmp_path):
    write_fake_runs(tmp_path / "a")
    markdown = results.to_markdown(results.build_table(results.collect(tmp_path / "a")))
    assert "### cifar100: val top-1 (%), val = test split" in markdown
    held_out = {**DATA, "init_args": {"batch_size": 64, "val_fraction": 0.1}}
    write_run(tmp_path / "b/kd", offline_kd([KD]), [(0, 0.5)])
    write_run(tmp_path / "b/kd_held_out", offline_kd([KD]), [(0, 0.6)], seed=1)
    config = yaml.safe_load((tmp_path / "b/kd_held_out/config.yaml").read_text())
    (tmp_path / "b/kd_held_out/config.yaml").write_text(yaml.safe_dump({**config, "data": held_out}))
    table = results.build_table(results.collect(tmp_path / "b"))
    markdown = results.to_markdown(table)
    assert "### cifar100: val top-1 (%)\n" in markdown  # mixed: every cell names its split
    assert "| 50.00 [50.00] (val = test split) | 60.00 [60.00] (held-out val) |" in markdown
    lines = list(csv.DictReader(io.StringIO(results.to_csv(table))))
    assert [line["val_split"] for line in lines] == ["val = test split", "held-out val"]


def test_csv_has_one_line_per_cell(tmp_path):
    root = write_fake_runs(tmp_path)
    lines = list(csv.DictReader(io.StringIO(results.to_csv(results.build_table(results.collect(root)), root))))
    assert [line["method"] for line in lines] == ["teacher", "student", "kd", "pwkd:kd"]
    kd = lines[2]
    assert (kd["n"], kd["seeds"], kd["last_mean"], kd["best_mean"]) == ("2", "0;1", "67.0", "68.0")
    assert math.isclose(float(kd["last_std"]), math.sqrt(2), abs_tol=1e-4)
    assert math.isclose(float(kd["best_std"]), math.sqrt(8), abs_tol=1e-4)
    assert (kd["seconds_mean"], kd["unfinished"], kd["runs"]) == ("4500.0", "0", "kd/version_0;kd/version_2")
    assert lines[1]["unfinished"] == "1" and lines[0]["last_std"] == ""


def test_resumed_epochs_keep_last_value_and_stages_are_found(tmp_path):
    write_fake_runs(tmp_path)
    assert series(read_metrics(tmp_path / "kd/version_2"), "val/top1") == [(0, 0.55), (1, 0.65), (2, 0.66)]
    assert stage_starts(read_metrics(tmp_path / "pwkd/a")) == [2]
    assert stage_starts(read_metrics(tmp_path / "kd/version_0")) == []
    table = results.build_table(results.collect(tmp_path))
    figure = val_top1_figure(table, table.rows[0])
    assert figure.axes[0].get_title().endswith("(stages shaded)")


@pytest.mark.slow
def test_cli_prints_table_and_writes_files_and_plots(tmp_path, capsys):
    root, out = write_fake_runs(tmp_path / "runs"), tmp_path / "out"
    results.main([str(root), "--out", str(out), "--format", "csv"])
    assert capsys.readouterr().out == (out / "results.csv").read_text()
    assert "67.00 ± 1.41 [68.00]" in (out / "results.md").read_text()
    for name in ("val_top1", "lr"):
        png = out / f"{name}_cifar100_resnet56-resnet20.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def card_of(model: dict):
    return method_class(model["class_path"]).card(model["init_args"])


def test_methods_describe_their_runs():
    """Columns and run names come from the method classes, not from the tools."""
    assert card_of(offline_kd([KD, CRD])).column == "crd+kd"
    assert card_of(offline_kd([KD], "distill.methods.KR")).column == "kr:kd"
    assert card_of(offline_kd([KD])).name_parts == ("resnet56", "resnet20")
    dml = card_of({"class_path": "distill.methods.DML", "init_args": {"student": "resnet20"}})
    assert (dml.column, dml.student_column, dml.teacher, dml.name_parts) == ("dml", "dml", None, ("resnet20",) * 2)
    scratch = card_of(supervised("resnet20"))
    assert (scratch.student_column, scratch.teacher_column, scratch.name_parts) == ("student", "teacher", ("resnet20",))
    slim = card_of(
        {
            "class_path": "distill.methods.SlimmableSupervised",
            "init_args": {"model": "resnet56", "train_widths": [0.25]},
        }
    )
    assert (slim.teacher_column, slim.name_parts) == ("slimmable teacher", ("resnet56", "w0_25"))


def test_methods_and_variants_come_from_the_config(tmp_path):
    hot = {**KD, "init_args": {"weight": 0.9, "temperature": 2.0}}
    write_run(tmp_path / "a", offline_kd([KD]), [(0, 0.5)])
    write_run(tmp_path / "b", offline_kd([hot]), [(0, 0.6)])
    write_run(tmp_path / "dml", {"class_path": "distill.methods.DML", "init_args": {"student": "resnet20"}}, [(0, 0.4)])
    table = results.build_table(results.collect(tmp_path))
    assert table.columns["cifar100"] == ["kd (temperature=2.0)", "kd (temperature=4.0)", "dml"]


def test_stage_plans_and_teacher_lists_tell_ablations_apart(tmp_path):
    """PWKD ablations differ in the stage widths, the stage plan or per-stage teacher files."""
    pwkd = offline_kd([KD], cls="distill.methods.PWKD")

    def with_widths(model, widths):
        return {**model, "init_args": {**model["init_args"], "stage_widths": widths}}

    narrow = {**pwkd, "init_args": {**pwkd["init_args"], "stage_teacher_weights": [f"w{k}.ckpt" for k in range(4)]}}
    for name, model, widths, lr in (
        ("a", pwkd, [0.25, 0.5, 0.75, 1.0], "own"),
        ("b", pwkd, [1.0] * 4, "own"),
        ("c", narrow, [0.25, 0.5, 0.75, 1.0], "own"),
        ("d", pwkd, [0.25, 0.5, 0.75, 1.0], "monotone"),
    ):
        write_run(tmp_path / name, with_widths(model, widths), [(0, 0.5), (1, 0.6)])
        config = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        config["stages"] = {"epochs": None, "lr": lr}
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(config))
    labels = sorted(run.method for run in results.collect(tmp_path))
    assert labels == [
        "pwkd:kd (stage_teacher_weights=-, stage_widths=[0.25, 0.5, 0.75, 1.0], lr=monotone)",
        "pwkd:kd (stage_teacher_weights=-, stage_widths=[0.25, 0.5, 0.75, 1.0], lr=own)",
        "pwkd:kd (stage_teacher_weights=-, stage_widths=[1.0, 1.0, 1.0, 1.0], lr=own)",
        "pwkd:kd (stage_teacher_weights=4 files, stage_widths=[0.25, 0.5, 0.75, 1.0], lr=own)",
    ]


@pytest.mark.slow
def test_real_digits_run_is_read_back(in_tmp, tmp_path):
    import torch

    from distill.models import create_model

    torch.manual_seed(0)
    torch.save(create_model("resnet20", num_classes=10, in_chans=1).state_dict(), tmp_path / "teacher.pt")
    distill(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits/pair.yaml"),
            "--config",
            str(CONFIGS / "methods/kd.yaml"),
            f"--model.init_args.teacher_weights={tmp_path / 'teacher.pt'}",
            "--trainer.max_epochs=2",
            *FAST,
        ]
    )
    (run,) = results.collect(in_tmp / "runs")
    logged = [v for _, v in series(read_metrics(run.path), "val/top1")]
    assert (run.dataset, run.teacher, run.student, run.method, run.seed) == ("digits", "resnet20", "resnet8", "kd", 0)
    assert (run.last, run.best, run.epochs, run.finished) == (100 * logged[-1], 100 * max(logged), 2, True)
    assert run.seconds > 0  # summary.json of RunSummary


REPRODUCE = CONFIGS.parent / "scripts/reproduce_cifar100.py"


def reproduce(*args, cwd):
    result = subprocess.run(
        [sys.executable, str(REPRODUCE), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_reproduction_dry_run_counts_every_job(tmp_path):
    # the whole anchor table: 6 teachers + 9 students × 3 seeds + 10 pairs × 5 methods × 3 seeds
    assert len(reproduce("--dry-run", cwd=tmp_path)) == 6 + 9 * 3 + 10 * 5 * 3
    pairs = ["resnet56_resnet20", "vgg13_MobileNetV2", "ResNet50_MobileNetV2"]  # MobileNetV2 trained once
    args = ["--dry-run", "--pairs", *pairs, "--methods", "kd", "crd", "--seeds", "0", "1", "--runs", "r"]
    commands = reproduce(*args, cwd=tmp_path)
    assert len(commands) == 3 + 2 * 2 + 3 * 2 * 2
    assert all(" -m distill.cli fit " in c and " --ckpt_path=last" in c for c in commands)
    teacher = tmp_path / "r/cifar100/supervised/ResNet50"  # its newest finished run
    assert commands[-1].endswith(f"--model.init_args.teacher_weights={teacher} --seed_everything=1")
    finished = tmp_path / "r/cifar100/supervised/resnet56/version_0"
    (finished / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 7}, finished / "checkpoints/last.ckpt")
    (finished / "summary.json").write_text('{"global_step": 3}')  # resumed after it finished, then stopped
    assert len(reproduce(*args, cwd=tmp_path)) == len(commands)
    (finished / "summary.json").write_text('{"global_step": 7}')  # a finished teacher is not trained again
    assert len(reproduce(*args, cwd=tmp_path)) == len(commands) - 1


def test_reproduction_writes_slurm_arrays(tmp_path):
    reproduce(
        "--slurm",
        "sl",
        "--pairs",
        "resnet56_resnet20",
        "--methods",
        "kd",
        "--seeds",
        "0",
        "1",
        "--",
        "--trainer.precision=bf16-mixed",
        cwd=tmp_path,
    )
    teachers, jobs = (
        (tmp_path / "sl/teachers.txt").read_text().splitlines(),
        (tmp_path / "sl/jobs.txt").read_text().splitlines(),
    )
    assert (len(teachers), len(jobs)) == (1, 4)
    assert all(line.endswith("--trainer.precision=bf16-mixed") for line in teachers + jobs)
    submit = (tmp_path / "sl/submit.sh").read_text()
    assert "--array=1-1 " in submit and "--dependency=afterok:$teachers" in submit and "--array=1-4 " in submit
    assert "--dependency=afterany:$jobs" in submit and "distill.tools.results" in submit
