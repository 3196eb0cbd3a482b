"""Reliability: arguments applied or refused on resume, checked constructors, no lost or misleading
records, one-line errors, file modes of exports."""

import gzip
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fakedata import write_fake_fashion_mnist
from helpers import CONFIGS, FAST
from rank_dump import run_two_ranks

from distill import checks
from distill.callbacks.partial_epoch import RESUMED_AT
from distill.callbacks.stages import StagePlan
from distill.cli import build_cli, main
from distill.data import DigitsDataModule
from distill.errors import ConfigError, MissingFileError, UserError, find_user_error
from distill.losses import ATTerm, CRDTerm, DKDTerm, KDTerm, RKDTerm
from distill.methods import DML, KR, PWKD, SOKD, OfflineKD, Supervised
from distill.models import create_model
from distill.resume import CONFIG_STATE_KEY, differences
from distill.run_dirs import is_finished, run_checkpoint
from distill.schedules import CyclicCosine, MultiStep
from distill.stages import Stage, stage_epochs
from distill.tools.export import export, load_network
from distill.tools.runs import find_runs, read_config, read_metrics

TEACHER = ["fit", "--config", str(CONFIGS / "digits/teacher.yaml"), *FAST]
RUN = Path("runs/digits/supervised/resnet20")
DIGITS = {"num_classes": 10, "in_chans": 1, "image_size": 16}


def fail(args: list[str], capsys) -> str:
    """``main(args)`` must stop with a one-line error (status 1 or 2) and no traceback; returns the line."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code in (1, 2)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill: error:")]
    assert len(lines) == 1
    return lines[0]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A finished one-epoch digits teacher run (``runs/digits/supervised/resnet20/version_0``)."""
    root = tmp_path_factory.mktemp("teacher_run")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main([*TEACHER, "--trainer.max_epochs=1"])
    finally:
        os.chdir(cwd)
    return root / RUN / "version_0"


@pytest.fixture
def run_copy(in_tmp, teacher_run):
    """A private copy of the teacher run, in this test's working directory."""
    shutil.copytree(teacher_run, in_tmp / RUN / "version_0")
    return in_tmp / RUN / "version_0"


# ---- 2. resume: every argument applied or refused --------------------------------------------------
def test_resume_refuses_a_changed_model_argument_and_writes_nothing(run_copy, capsys):
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    line = fail(
        [
            *TEACHER,
            "--trainer.max_epochs=2",
            "--model.init_args.lr=0.5",
            f"--ckpt_path={run_copy / 'checkpoints/last.ckpt'}",
        ],
        capsys,
    )
    assert "model.init_args.lr=0.5 (the checkpoint has 0.05)" in line and "last.ckpt" in line
    assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()} == before  # item 5: nothing written
    assert not (run_copy.parent / "version_1").exists()


def test_resume_applies_what_may_change_and_keeps_every_segments_config(run_copy):
    last = run_copy / "checkpoints/last.ckpt"
    main([*TEACHER, "--trainer.max_epochs=2", f"--ckpt_path={last}"])
    main([*TEACHER, "--trainer.max_epochs=3", f"--ckpt_path={last}"])
    assert torch.load(last, weights_only=True)["epoch"] == 2  # max_epochs was applied: 3 epochs of 2 batches
    configs = [yaml.safe_load((run_copy / name).read_text()) for name in ("config.yaml", "config.resume-1.yaml")]
    configs.append(yaml.safe_load((run_copy / "config.resume-2.yaml").read_text()))
    assert [c["trainer"]["max_epochs"] for c in configs] == [1, 2, 3]
    assert configs[1]["ckpt_path"] == str(last)
    assert find_runs(run_copy.parent) == [run_copy] and read_config(run_copy)["trainer"]["max_epochs"] == 3


def test_resume_refuses_a_changed_callback_argument_but_not_an_added_callback(run_copy):
    last = run_copy / "checkpoints/last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    stored = checkpoint["callbacks"][CONFIG_STATE_KEY]["config"]
    plan = {"class_path": "pytorch_lightning.callbacks.EarlyStopping", "init_args": {"patience": 3}}
    extra = {"class_path": "pytorch_lightning.callbacks.LearningRateMonitor", "init_args": {}}
    with_plan = {**stored, "trainer": {**stored["trainer"], "callbacks": [plan]}}
    other_plan = {"class_path": plan["class_path"], "init_args": {"patience": 5}}
    assert differences(with_plan, {**stored, "trainer": {**stored["trainer"], "callbacks": [plan, extra]}}) == []
    found = differences(with_plan, {**stored, "trainer": {**stored["trainer"], "callbacks": [other_plan]}})
    assert [key for key, _, _ in found] == [
        "trainer.callbacks[pytorch_lightning.callbacks.EarlyStopping].init_args.patience"
    ]
    assert [k for k, _, _ in differences(stored, {**stored, "seed_everything": 1})] == ["seed_everything"]


def test_resume_from_a_checkpoint_without_a_stored_config_compares_the_model_arguments(run_copy, capsys):
    last = run_copy / "checkpoints/last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    del checkpoint["callbacks"][CONFIG_STATE_KEY]  # as written before the config was stored
    torch.save(checkpoint, last)
    line = fail([*TEACHER, "--trainer.max_epochs=2", "--model.init_args.momentum=0.5", f"--ckpt_path={last}"], capsys)
    assert "model.init_args.momentum=0.5 (the checkpoint has 0.9)" in line


def test_evaluation_refuses_other_model_arguments(run_copy, capsys):
    last = run_copy / "checkpoints/last.ckpt"
    validate = ["validate", *TEACHER[1:], f"--ckpt_path={last}"]
    assert "model.init_args.model='resnet8'" in fail([*validate, "--model.init_args.model=resnet8"], capsys)
    main([*validate, "--data.init_args.batch_size=32"])  # data and trainer may differ when evaluating


def test_resume_refuses_other_teacher_weights_but_not_a_moved_copy(in_tmp, capsys):
    torch.manual_seed(0)
    torch.save(create_model("resnet20", num_classes=10, in_chans=1).state_dict(), in_tmp / "teacher.pt")
    torch.save(create_model("resnet20", num_classes=10, in_chans=1).state_dict(), in_tmp / "other.pt")
    shutil.copy(in_tmp / "teacher.pt", in_tmp / "moved.pt")
    pair = ["fit", "--config", str(CONFIGS / "digits/pair.yaml"), "--config", str(CONFIGS / "methods/kd.yaml"), *FAST]
    main([*pair, "--trainer.max_epochs=1", f"--model.init_args.teacher_weights={in_tmp / 'teacher.pt'}"])
    last = next(in_tmp.glob("runs/**/last.ckpt"))
    resume = [*pair, "--trainer.max_epochs=2", f"--ckpt_path={last}"]
    line = fail([*resume, f"--model.init_args.teacher_weights={in_tmp / 'other.pt'}"], capsys)
    assert "teacher weights differ" in line and "other.pt" in line
    main([*resume, f"--model.init_args.teacher_weights={in_tmp / 'moved.pt'}"])
    assert torch.load(last, weights_only=True)["epoch"] == 1


def test_a_resume_refused_while_restoring_leaves_the_run_as_it_was(in_tmp, capsys):
    torch.manual_seed(0)
    torch.save(create_model("resnet20", num_classes=10, in_chans=1).state_dict(), in_tmp / "teacher.pt")
    sskd = ["fit", "--config", str(CONFIGS / "digits/pair.yaml"), "--config", str(CONFIGS / "digits/sskd.yaml"), *FAST]
    sskd.append(f"--model.init_args.teacher_weights={in_tmp / 'teacher.pt'}")
    main([*sskd, "--trainer.max_epochs=4"])  # four phases of one epoch
    run = next(in_tmp.glob("runs/**/version_0"))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    line = fail([*sskd, "--trainer.max_epochs=5", f"--ckpt_path={run / 'checkpoints/last.ckpt'}"], capsys)
    assert "differs from the checkpoint's" in line and "'epochs': [1, 1, 1, 1]" in line  # refused by the restored plan
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


# ---- 3. constructor checks --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: KDTerm(temperature=-4), "KDTerm temperature=-4: expected a number > 0"),
        (lambda: KDTerm(temperature=0), "KDTerm temperature=0"),
        (lambda: KDTerm(weight=-0.1), "KDTerm weight=-0.1: expected a number >= 0"),
        (lambda: ATTerm(weight=float("nan")), "ATTerm weight=nan"),
        (lambda: DKDTerm(beta=-8.0), "DKDTerm beta=-8.0"),
        (lambda: DKDTerm(warmup=2.5), "DKDTerm warmup=2.5: expected an integer >= 0"),
        (lambda: RKDTerm(angle_weight=-1.0), "RKDTerm angle_weight"),
        (lambda: CRDTerm(momentum=1.0), r"CRDTerm momentum=1.0: expected a fraction in \[0, 1\)"),
        (lambda: CRDTerm(num_negatives=0), "CRDTerm num_negatives=0"),
        (lambda: Supervised(model="resnet8", lr=0.0, **DIGITS), "Supervised lr=0.0"),
        (lambda: Supervised(model="resnet8", momentum=1.0, **DIGITS), "Supervised momentum=1.0"),
        (lambda: Supervised(model="resnet8", optimizer="adam", **DIGITS), "Supervised optimizer='adam'"),
        (lambda: OfflineKD(student="resnet8", teacher="resnet8", ce_weight=-1.0, **DIGITS), "OfflineKD ce_weight"),
        (lambda: DML(student="resnet8", temperature=0.0, **DIGITS), "DML temperature=0.0"),
        (lambda: SOKD(student="resnet8", teacher="resnet20", kl_weight=-1.0, **DIGITS), "SOKD kl_weight=-1.0"),
        (lambda: KR(student="resnet8", teacher="resnet8", rho=1.5, **DIGITS), "KR rho=1.5"),
        (lambda: PWKD(stage_widths=[0.5, 1.5], **DIGITS), r"PWKD stage_widths=1.5: expected a fraction in \(0, 1\]"),
        (lambda: PWKD(stage_widths=[0.5, 0.25, 1.0], **DIGITS), "do not decrease and end at 1.0"),
        (lambda: PWKD(stage_widths=[0.25, 0.5], **DIGITS), "do not decrease and end at 1.0"),
        (lambda: StagePlan(epochs=[3, 0]), r"StagePlan epochs=\[3, 0\]: expected a list of integers > 0"),
        (lambda: stage_epochs([Stage("a"), Stage("b")], 4, [1, 2]), "sum to 3, but trainer.max_epochs=4"),
        (lambda: StagePlan(step_gamma=0.0), "StagePlan step_gamma=0.0"),
        (
            lambda: StagePlan(step_milestones=[0.5, 1.0]),
            r"StagePlan step_milestones=1.0: expected a fraction in \(0, 1\)",
        ),
        (lambda: MultiStep(gamma=0.0), "MultiStep gamma=0.0"),
        (lambda: CyclicCosine([10, 0]), "CyclicCosine cycle_epochs=0"),
        (lambda: CyclicCosine([10], min_factor=2.0), "CyclicCosine min_factor=2.0"),
        (lambda: DigitsDataModule(batch_size=0), "DigitsDataModule batch_size=0: expected an integer > 0"),
        (lambda: DigitsDataModule(test_fraction=1.0), "DigitsDataModule test_fraction=1.0"),
    ],
)
def test_constructors_refuse_bad_numbers_naming_owner_and_argument(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_checks_accept_their_boundaries_and_refuse_look_alikes():
    checks.fraction("o", "k", 0.0, zero=True)
    checks.fraction("o", "k", 1.0)
    checks.ordered("o", "k", [0.25, 0.25, 1.0])
    checks.ordered("o", "k", [1.0, 0.5], descending=True)
    checks.sums_to("o", "k", [2, 2], 4, "trainer.max_epochs")
    for bad in (True, 2.0, "3", float("inf")):
        with pytest.raises(ConfigError, match=f"o k={bad!r}: expected an integer > 0"):
            checks.positive_int("o", "k", bad)
    with pytest.raises(ConfigError, match="increasing"):
        checks.ordered("o", "k", [1, 1], strict=True)
    with pytest.raises(ValueError):  # ConfigError stays a ValueError for callers that catch that
        checks.positive("o", "k", -1)


# ---- 4. failed starts use up no version; a teacher run named without its version ------------------------
def test_a_data_error_after_the_logger_starts_leaves_no_run_directory(in_tmp, capsys):
    fashion = [*TEACHER, "--data=distill.data.FashionMNISTDataModule", "--data.init_args.num_workers=0"]
    line = fail([*fashion, f"--data.init_args.data_dir={in_tmp / 'empty'}", "--trainer.max_epochs=1"], capsys)
    assert "Fashion-MNIST not found" in line
    assert not (in_tmp / "runs/fashionmnist").exists()
    assert "--ckpt_path" in fail([*TEACHER, "--ckpt_path=missing.ckpt"], capsys)
    assert not (in_tmp / "runs").exists()
    write_fake_fashion_mnist(in_tmp / "fashion")
    main([*fashion, f"--data.init_args.data_dir={in_tmp / 'fashion'}", "--trainer.max_epochs=1"])
    assert [p.name for p in (in_tmp / "runs/fashionmnist/supervised/resnet20").iterdir()] == ["version_0"]


def test_a_teacher_named_without_version_is_the_newest_finished_run(run_copy, in_tmp):
    runs = run_copy.parent
    shutil.copytree(run_copy, runs / "version_1")
    (runs / "version_1/summary.json").unlink()  # stopped by a signal or a crash
    shutil.copytree(run_copy, runs / "version_2")
    summary = json.loads((runs / "version_2/summary.json").read_text())
    (runs / "version_2/summary.json").write_text(json.dumps({**summary, "global_step": 99}))  # resumed, stopped
    assert [is_finished(runs / f"version_{n}") for n in range(3)] == [True, False, False]
    assert run_checkpoint(str(runs)) == str(run_copy / "checkpoints/last.ckpt")
    assert run_checkpoint(str(runs / "version_1")) == str(runs / "version_1/checkpoints/last.ckpt")
    (in_tmp / "empty_run_dir").mkdir()
    with pytest.raises(MissingFileError, match="teacher_weights=.*empty_run_dir.*no finished run there"):
        run_checkpoint(str(in_tmp / "empty_run_dir"), "teacher_weights")
    main(["fit", "--config", str(CONFIGS / "digits/pair.yaml"), "--config", str(CONFIGS / "methods/kd.yaml"), *FAST])
    kd = torch.load(next(in_tmp.glob("runs/digits/offlinekd/**/last.ckpt")), weights_only=True)
    assert kd["distill_teacher"]["weights"] == str(RUN / "version_0/checkpoints/last.ckpt")


def test_configs_name_teacher_runs_without_a_version():
    named = [p for p in CONFIGS.rglob("*.yaml") if re.search(r"version_\d", p.read_text())]
    assert named == []


# ---- 6. an epoch resumed in the middle is marked ---------------------------------------------------------
def test_an_epoch_resumed_mid_way_is_marked_in_metrics(in_tmp):
    steps = [*TEACHER, "--trainer.limit_train_batches=4", "--last_checkpoint.every_n_train_steps=1"]
    main([*steps, "--trainer.max_epochs=1", "--trainer.max_steps=3"])  # stops after batch 2 of epoch 0
    main([*steps, "--trainer.max_epochs=2", f"--ckpt_path={in_tmp / RUN / 'version_0/checkpoints/last.ckpt'}"])
    rows = read_metrics(in_tmp / RUN / "version_0")
    marked = [(int(r["epoch"]), r[RESUMED_AT]) for r in rows if RESUMED_AT in r]
    assert marked == [(0, 3.0)]  # epoch 0's aggregates after the resume cover batches 3.. only; epoch 1 is whole
    assert any(r.get("epoch") == 1 and "train/loss_epoch" in r for r in rows)


# ---- 7. errors that say what to do ------------------------------------------------------------------------
def test_a_bit_flipped_fashion_mnist_file_is_named(in_tmp, capsys):
    write_fake_fashion_mnist(in_tmp)
    labels = in_tmp / "train-labels-idx1-ubyte.gz"
    data = bytearray(labels.read_bytes())
    data[10] = 0xFF  # the first deflate block header: a reserved block type
    labels.write_bytes(bytes(data))
    with pytest.raises(gzip.zlib.error):
        gzip.decompress(bytes(data))  # what the file gives without distill
    line = fail([*TEACHER, "--data=distill.data.FashionMNISTDataModule", f"--data.init_args.data_dir={in_tmp}"], capsys)
    assert str(labels) in line and "unreadable" in line and "replace the file" in line


@pytest.mark.parametrize("damage", ["truncated", "malicious"])
def test_a_damaged_checkpoint_is_named_without_suggesting_weights_only_false(run_copy, capsys, damage):
    last = run_copy / "checkpoints/last.ckpt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:5000])
    else:
        torch.save({"state_dict": {}, "payload": Exec()}, last)
    line = fail([*TEACHER, "--trainer.max_epochs=2", f"--ckpt_path={last}"], capsys)
    assert str(last) in line and "refused to load" in line and "weights_only" not in line


def test_a_state_dict_given_as_ckpt_path_says_where_weights_go(in_tmp, capsys):
    torch.save(create_model("resnet20", num_classes=10, in_chans=1).state_dict(), in_tmp / "weights.pt")
    line = fail([*TEACHER, f"--ckpt_path={in_tmp / 'weights.pt'}"], capsys)
    assert "not a checkpoint of a distill run" in line and "model.init_args.weights" in line
    assert not (in_tmp / "runs").exists()


class Exec:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_yaml_syntax_error_names_the_file_and_line(in_tmp, capsys):
    bad = in_tmp / "bad.yaml"
    bad.write_text("model:\n  class_path: distill.methods.Supervised\n  init_args: {model: resnet20\n")
    line = fail(["fit", "--config", str(bad)], capsys)
    assert f"{bad}: not valid YAML at line 4" in line and "<unicode string>" not in line
    nested = in_tmp / "nested.yaml"
    nested.write_text("trainer: bad.yaml\n")
    assert f"{bad}: not valid YAML" in fail(["fit", "--config", str(nested)], capsys)


def test_an_unwritable_save_dir_is_named(in_tmp, capsys):
    (in_tmp / "a_file").write_text("")
    line = fail([*TEACHER, f"--trainer.logger.init_args.save_dir={in_tmp / 'a_file/runs'}"], capsys)
    assert "trainer.logger.init_args.save_dir=" in line and "cannot write there" in line


def test_a_bad_model_argument_is_one_line_and_debug_shows_the_traceback(in_tmp, capsys, monkeypatch):
    line = fail([*TEACHER, "--model.init_args.model=resnet21"], capsys)
    assert "unknown model 'resnet21'; known models:" in line and "Namespace(" not in line
    assert "model.init_args.lr: Expected a <class 'float'>" in fail([*TEACHER, "--model.init_args.lr=abc"], capsys)
    monkeypatch.setenv("DISTILL_DEBUG", "0")  # restored after the test: --debug sets it for DDP processes
    with pytest.raises(KeyError, match="resnet21"):
        main([*TEACHER, "--model.init_args.model=resnet21", "--debug"])
    monkeypatch.setenv("DISTILL_DEBUG", "1")
    with pytest.raises(ValueError, match="lr=-1"):
        main([*TEACHER, "--model.init_args.lr=-1"])


def test_a_bug_keeps_its_traceback(in_tmp, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(Supervised, "training_losses", broken)
    with pytest.raises(ZeroDivisionError):
        main([*TEACHER, "--trainer.max_epochs=1"])
    assert find_user_error(ZeroDivisionError()) is None
    wrapped = ValueError("wrapped")
    wrapped.__cause__ = ConfigError("inner")
    assert isinstance(find_user_error(wrapped), UserError)


def test_the_console_script_prints_one_line(in_tmp):
    (in_tmp / "bad.yaml").write_text("trainer: [\n")
    result = subprocess.run(
        [sys.executable, "-m", "distill.cli", "fit", "--config", "bad.yaml"], capture_output=True, text=True, cwd=in_tmp
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith("distill: error: bad.yaml: not valid YAML at line 2")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---- 9. no process group is left for the interpreter's finalisation -----------------------------------------
def test_two_process_runs_release_their_process_group_before_exit(tmp_path):
    args = [*TEACHER, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1"]
    ranks = run_two_ranks(args, tmp_path, callback="rank_dump.ProcessGroupAtExit")
    assert [bool(rank["alive"]) for rank in ranks] == [False, False]


# ---- 8. exported files get the same mode -------------------------------------------------------------------
def test_exported_files_respect_the_umask_alike(run_copy, tmp_path):
    previous = os.umask(0o022)
    try:
        paths = export(
            load_network(run_copy / "checkpoints/last.ckpt"), tmp_path / "out", formats=("pt", "safetensors")
        )
    finally:
        os.umask(previous)
    assert {name: stat.S_IMODE(p.stat().st_mode) for name, p in paths.items()} == {
        "pt": 0o644,
        "safetensors": 0o644,
        "json": 0o644,
    }


# ---- issue 16: the help ------------------------------------------------------------------------------------
def test_help_names_the_project_its_commands_and_the_docs(capsys):
    main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("distill: knowledge distillation")
    for command in ("fit", "validate", "test", "predict", "export"):
        assert any(line.split()[:1] == [command] for line in text.splitlines())
    assert "docs/index.md" in text
    with pytest.raises(SystemExit) as stop:
        main(["export", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert all(option in text for option in ("--out", "--network", "--width", "--formats", "--arch"))
    assert "teacher-improved" in text and "SOKD" in text


def test_build_cli_raises_what_main_presents(in_tmp):
    with pytest.raises(ConfigError, match="Supervised lr=-1.0"):
        build_cli([*TEACHER, "--model.init_args.lr=-1"])
