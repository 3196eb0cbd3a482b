"""The teacher cache: a student trained from stored fp32 teacher logits ends bit-identical to one trained with
the live teacher (KD and PWKD:KD, a resume mid-epoch, two-process DDP); what a store refuses, and how an
interrupted pass resumes."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from fakedata import write_fake_cifar100
from helpers import CONFIGS, FAST
from rank_dump import assert_same_tensors, run_two_ranks

from distill.callbacks.preemption import PreemptionCheckpoint
from distill.cli import main
from distill.data import CIFAR100DataModule, DigitsDataModule
from distill.data.teacher_cache import TeacherCache, TeacherCacheWriter, replay_refusal
from distill.losses import ATTerm, DKDTerm, FitNetTerm, KDTerm
from distill.methods import DML, OfflineKD
from distill.methods.kr import KR
from distill.methods.sokd import SOKD
from distill.methods.teacher import TeacherMixin
from distill.models import create_model
from distill.models.slimmable import make_slimmable
from distill.tools.cache_teacher import refusal
from distill.tools.runs import read_metrics

FULL_EPOCHS = [a for a in FAST if not a.startswith("--trainer.limit_train_batches")]  # 5 batches, the last of 16
STOP_AT = 7  # epoch 1, batch 2
REPRODUCE = CONFIGS.parent / "scripts/reproduce_cifar100.py"


class StopAtStep(pl.Callback):
    """Test-only: the preemption callback stops the fit after step ``step``, as after a SIGTERM (no signal sent)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            preemption = next(c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint))
            preemption.received.append(signal.SIGTERM)


def digits_args(teacher: Path, *configs: str, epochs: int = 2) -> list[str]:
    files = [str(CONFIGS / "digits/pair.yaml"), *configs]
    return [
        *(a for config in files for a in ("--config", config)),
        f"--model.init_args.teacher_weights={teacher}",
        f"--trainer.max_epochs={epochs}",
        *FULL_EPOCHS,
    ]


def cache(args: list[str], out: Path, *extra: str) -> Path:
    return main(["cache-teacher", *args, "--out", str(out), "--no-progress", *extra])


def fit(args: list[str], name: str, *extra: str) -> dict:
    """``distill fit`` in the current directory; the last checkpoint's weights."""
    main(["fit", *args, f"--trainer.logger.init_args.name={name}", *extra])
    return torch.load(Path(f"runs/{name}/version_0/checkpoints/last.ckpt"), weights_only=True)["state_dict"]


def fit_resumed(args: list[str], name: str) -> dict:
    """The same fit stopped mid-epoch (after step ``STOP_AT``) and resumed from its ``last.ckpt``."""
    stop = ["--trainer.callbacks+=test_teacher_cache.StopAtStep", f"--trainer.callbacks.step={STOP_AT}"]
    with pytest.raises(SystemExit):
        fit(args, name, *stop)
    ckpt = Path(f"runs/{name}/version_0/checkpoints/last.ckpt")
    assert torch.load(ckpt, weights_only=True)["global_step"] == STOP_AT + 1
    return fit(args, name, f"--ckpt_path={ckpt}")


@pytest.fixture(scope="module")
def digits_kd(tmp_path_factory):
    """A random digits teacher, its store for two epochs of the KD pair, and the live-teacher run's weights."""
    root = tmp_path_factory.mktemp("kd")
    torch.manual_seed(0)
    teacher = root / "teacher.pt"
    torch.save(create_model("resnet20", num_classes=10, in_chans=1).state_dict(), teacher)
    args = digits_args(teacher, str(CONFIGS / "methods/kd.yaml"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        store = cache(args, root / "store")
        live = fit(args, "live")
    return root, args, store, live


def forbid_teacher_in_training_steps(monkeypatch):
    def refuse(self, images):
        raise AssertionError("the teacher ran in a training step")

    monkeypatch.setattr(TeacherMixin, "teacher_forward", refuse)


def test_kd_from_the_cache_equals_the_live_teacher_bit_for_bit(digits_kd, monkeypatch):
    root, args, store, live = digits_kd
    monkeypatch.chdir(root)
    forbid_teacher_in_training_steps(monkeypatch)
    cached = fit(args, "cached", f"--model.init_args.teacher_cache={store}")
    assert_same_tensors(cached, live)
    rows = read_metrics(root / "runs/cached/version_0")
    assert any("val/teacher_top1" in r for r in rows)  # validation still runs the teacher, once
    meta = json.loads((store / "meta.json").read_text())
    assert meta["layout"] | {"epochs": 2, "world_size": 1, "rank_samples": 143, "batch_size": 32} == meta["layout"]
    assert (meta["dtype"], meta["logits_dtype"], meta["teacher_settings"]) == ("fp32", "float32", [None, None])


def test_kd_from_the_cache_resumed_mid_epoch_equals_the_live_teacher(digits_kd, monkeypatch):
    root, args, store, live = digits_kd
    monkeypatch.chdir(root)
    forbid_teacher_in_training_steps(monkeypatch)
    assert_same_tensors(fit_resumed([*args, f"--model.init_args.teacher_cache={store}"], "resumed"), live)


def test_pwkd_from_the_cache_resumed_mid_stage_equals_the_live_teacher(tmp_path, monkeypatch):
    """Four stages of one epoch (teacher widths 0.25 … 1.0); the cached run stops in stage 1 and resumes."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    teacher = tmp_path / "slim.pt"
    torch.save(
        make_slimmable(create_model("resnet20", num_classes=10, in_chans=1), image_size=16).state_dict(), teacher
    )
    args = digits_args(teacher, str(CONFIGS / "digits/pwkd.yaml"), epochs=4)
    store = cache(args, tmp_path / "store")
    settings = json.loads((store / "meta.json").read_text())["teacher_settings"]
    assert settings == [{"stage": k, "width": w} for k, w in enumerate([0.25, 0.5, 0.75, 1.0])]
    live = fit(args, "live")
    forbid_teacher_in_training_steps(monkeypatch)
    assert_same_tensors(fit_resumed([*args, f"--model.init_args.teacher_cache={store}"], "cached"), live)


@pytest.mark.ddp
def test_two_process_ddp_from_the_cache_equals_the_live_teacher(digits_kd, tmp_path, monkeypatch):
    _, args, _, _ = digits_kd
    monkeypatch.chdir(tmp_path)
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2"]
    store = cache([*args, *ddp], tmp_path / "store")
    assert json.loads((store / "meta.json").read_text())["layout"]["world_size"] == 2
    (tmp_path / "live").mkdir()
    (tmp_path / "cached").mkdir()
    live = run_two_ranks(["fit", *args], tmp_path / "live")
    cached = run_two_ranks(["fit", *args, f"--model.init_args.teacher_cache={store}"], tmp_path / "cached")
    assert_same_tensors(*live)
    for live_rank, cached_rank in zip(live, cached):
        assert_same_tensors(live_rank, cached_rank)


def test_a_fingerprint_mismatch_names_the_fields(digits_kd, monkeypatch):
    root, args, store, _ = digits_kd
    monkeypatch.chdir(root)
    other = ["--data.init_args.batch_size=16", "--data.init_args.seed=3", "--trainer.max_epochs=3"]
    with pytest.raises(ValueError, match="was written for another run") as error:
        fit([*args, *other, f"--model.init_args.teacher_cache={store}"], "mismatch")
    message = str(error.value)
    for field in ("batch_size: store 32, this run 16", "seed: store 0, this run 3", "epochs: store 2, this run 3"):
        assert field in message
    assert "teacher_sha256" not in message and "pipeline" not in message


@pytest.mark.parametrize(
    "terms, named",
    [
        ([KDTerm(), FitNetTerm()], "term 'fitnet' (FitNetTerm) reads the teacher's stages"),
        ([ATTerm()], "term 'at' (ATTerm) reads the teacher's stages"),
    ],
)
def test_a_term_reading_teacher_features_refuses_the_cache(tmp_path, terms, named):
    digits = dict(student="resnet8", teacher="resnet20", num_classes=10, in_chans=1, image_size=16)
    with pytest.raises(ValueError, match="holds teacher logits only") as error:
        OfflineKD(terms=terms, teacher_cache=str(tmp_path / "store"), **digits)
    assert named in str(error.value)
    with pytest.raises(ValueError, match="SOKD's training step reads the teacher's embedding, feature, stages"):
        SOKD(teacher_cache=str(tmp_path / "store"), **digits)


def test_logit_methods_accept_the_cache_and_methods_without_one_are_refused_by_the_pass(tmp_path):
    store = str(tmp_path / "store")  # opened at fit setup, not at construction
    digits = dict(student="resnet8", teacher="resnet20", num_classes=10, in_chans=1, image_size=16)
    for method in (
        OfflineKD(terms=[KDTerm(), DKDTerm()], teacher_cache=store, **digits),
        KR(terms=[KDTerm()], teacher_cache=store, **digits),
    ):
        assert refusal(method, DigitsDataModule()) is None
    dml = DML(student="resnet8", num_classes=10, in_chans=1, image_size=16)
    assert refusal(dml, DigitsDataModule()).startswith("DML is not an offline KD method")


def test_worker_pipelines_are_refused(tmp_path):
    assert replay_refusal(DigitsDataModule()) is None
    assert replay_refusal(CIFAR100DataModule(pipeline="device")) is None
    assert "set data.init_args.pipeline: device" in replay_refusal(CIFAR100DataModule(pipeline="torchvision"))
    from distill.data import ImageNetDataModule

    assert "not a pure function of the step" in replay_refusal(ImageNetDataModule(data_dir=str(tmp_path)))


def test_an_interrupted_pass_leaves_no_complete_store_and_resumes(digits_kd, tmp_path, monkeypatch):
    root, args, store, _ = digits_kd
    monkeypatch.chdir(root)
    append, calls = TeacherCacheWriter.append, []

    def append_then_die(self, logits, index):
        calls.append(len(index))
        if len(calls) == 7:  # epoch 1, batch 1: epoch 0 was committed at its end
            raise KeyboardInterrupt
        append(self, logits, index)

    monkeypatch.setattr(TeacherCacheWriter, "append", append_then_die)
    out = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        cache(args, out)
    assert not out.exists() and (tmp_path / "store.partial").is_dir()
    with pytest.raises(FileNotFoundError, match="interrupted pass"):
        TeacherCache(out)
    calls.clear()
    monkeypatch.setattr(
        TeacherCacheWriter, "append", lambda self, logits, index: (calls.append(1), append(self, logits, index))
    )
    cache(args, out)
    assert len(calls) == 5  # only epoch 1 was computed again
    for name in ("logits.bin", "index.bin"):
        assert (out / name).read_bytes() == (store / name).read_bytes()
    assert not (tmp_path / "store.partial").exists()
    calls.clear()
    cache(args, out)  # a finished store is left as it is
    assert not calls


def test_reduced_precision_stores_round_the_fp32_logits(digits_kd, tmp_path, monkeypatch):
    root, args, store, _ = digits_kd
    monkeypatch.chdir(root)
    full = TeacherCache(store)
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        compact = TeacherCache(cache(args, tmp_path / dtype, "--dtype", dtype))
        assert (compact.path / "logits.bin").stat().st_size * 2 == (store / "logits.bin").stat().st_size
        logits, index = compact.rows(1, 0, 4)
        expected, expected_index = full.rows(1, 0, 4)
        assert torch.equal(logits, expected.to(torch_dtype).float()) and torch.equal(index, expected_index)


def test_a_larger_teacher_batch_records_whether_it_is_exact(digits_kd, tmp_path, monkeypatch):
    root, args, store, _ = digits_kd
    monkeypatch.chdir(root)
    grouped = cache(args, tmp_path / "grouped", "--teacher-batch", "64")
    meta = json.loads((grouped / "meta.json").read_text())
    assert meta["teacher_batch"] == 64 and meta["teacher_batch_check"].startswith("first group of 64 rows")
    assert (grouped / "index.bin").read_bytes() == (store / "index.bin").read_bytes()
    with pytest.raises(ValueError, match="expected a multiple of the training batch size 32"):
        cache(args, tmp_path / "bad", "--teacher-batch", "48")


def test_reproduction_dry_run_counts_the_teacher_passes_saved(tmp_path):
    args = ["--dry-run", "--teacher-cache", "--pairs", "resnet56_resnet20", "resnet32x4_resnet8x4"]
    args += ["resnet32x4_ShuffleV1", "--methods", "kd", "dkd", "fitnet", "--seeds", "0", "1", "--runs", "r"]
    result = subprocess.run(
        [sys.executable, str(REPRODUCE), *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()
    caches = [c for c in commands if " -m distill.cli cache-teacher " in c]
    stores = [tmp_path / f"r/teacher_cache/cifar100/{teacher}/seed0" for teacher in ("resnet56", "resnet32x4")]
    assert [c.split(" --out ")[1].split()[0] for c in caches] == [str(s) for s in stores]  # one per teacher
    cached = [c for c in commands if "--model.init_args.teacher_cache=" in c]
    assert len(cached) == 3 * 2 * 2  # kd and dkd of three pairs, two seeds; fitnet reads teacher features
    assert "teacher cache: 2 teacher passes serve 12 runs: 10 passes saved" in result.stderr
    assert not any("/fitnet/" in c for c in cached)
    assert commands.index(caches[-1]) < min(commands.index(c) for c in cached)  # stores first
    students_and_methods = [c for c in commands if "cifar100/supervised/" not in c.split("init_args.name=")[-1]]
    assert all("--data.init_args.pipeline=device" in c for c in students_and_methods)


def test_fake_cifar_device_pipeline_round_trip(tmp_path, monkeypatch):
    """CIFAR-100's device pipeline (uint8 crops and flips on the device) through a store."""
    monkeypatch.chdir(tmp_path)
    data = write_fake_cifar100(tmp_path / "cifar", per_class_train=1, per_class_test=1)
    torch.manual_seed(0)
    teacher = tmp_path / "resnet8.pt"
    torch.save(create_model("resnet8").state_dict(), teacher)
    args = [
        "--config",
        str(CONFIGS / "cifar100/pairs/resnet56_resnet20.yaml"),
        "--config",
        str(CONFIGS / "methods/dkd.yaml"),
        "--model.init_args.teacher=resnet8",
        "--model.init_args.student=resnet8",
        f"--model.init_args.teacher_weights={teacher}",
        f"--data.init_args.data_dir={data}",
        "--data.init_args.verify_md5=false",
        "--data.init_args.pipeline=device",
        "--data.init_args.batch_size=32",
        "--trainer.max_epochs=2",
        *FAST,
    ]
    store = cache(args, tmp_path / "store")
    live = fit(args, "live")
    forbid_teacher_in_training_steps(monkeypatch)
    assert_same_tensors(fit([*args, f"--model.init_args.teacher_cache={store}"], "cached"), live)
