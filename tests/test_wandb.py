"""RunSummary: config, teacher identity and results reach W&B (offline, no network) and summary.json."""

import json
import os

import pytest
import torch
from helpers import CONFIGS, FAST

from distill.cli import main
from distill.models import create_model
from distill.models.weights import file_sha256
from distill.tools.runs import read_metrics, read_wandb_run, series

RUN = "runs/digits/offlinekd/resnet20-resnet8/version_0"


@pytest.fixture
def teacher(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    torch.save(create_model("resnet20", num_classes=10, in_chans=1).state_dict(), path)
    return path


def fit(teacher, epochs, *extra):
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits/pair.yaml"),
            "--config",
            str(CONFIGS / "methods/kd.yaml"),
            f"--model.init_args.teacher_weights={teacher}",
            f"--trainer.max_epochs={epochs}",
            *FAST,
            *extra,
        ]
    )


@pytest.mark.slow
def test_offline_wandb_run_holds_config_identity_metrics_and_summary(in_tmp, teacher, monkeypatch):
    import wandb

    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nowhere: any upload attempt would fail
    fit(teacher, 2, "--config", str(CONFIGS / "loggers/wandb.yaml"))
    wandb.finish()
    wandb.teardown()  # the offline transaction log is complete once the W&B service has stopped
    (run_dir,) = (in_tmp / "runs/wandb").glob("*-run-*")
    assert run_dir.name.startswith("offline-run-")
    logged = read_wandb_run(run_dir)

    config = logged["config"]
    assert config["config"]["trainer"]["max_epochs"] == 2  # the full resolved CLI config
    assert config["config"]["model"]["class_path"] == "distill.methods.OfflineKD"
    assert config["config"]["run_summary"] == {"filename": "summary.json"}
    assert config["teacher_info"]["sha256"] == file_sha256(teacher)
    student = create_model("resnet8", num_classes=10, in_chans=1)
    assert config["student_params"] == sum(p.numel() for p in student.parameters())
    assert config["lr"] == 0.05  # the module's own hyperparameters, as Lightning logs them

    csv_top1 = [v for _, v in series(read_metrics(in_tmp / RUN), "val/top1")]
    assert [row["val/top1"] for row in logged["history"] if "val/top1" in row] == pytest.approx(csv_top1)
    summary = json.loads((in_tmp / RUN / "summary.json").read_text())
    assert summary["val/top1_last"] == pytest.approx(csv_top1[-1])
    assert summary["val/top1_best"] == pytest.approx(max(csv_top1))
    assert summary["teacher_info"]["val_top1"] == summary["val/teacher_top1_last"]
    assert summary["epochs"] == 2 and summary["run_time_s"] > 0
    for key in ("val/top1_last", "val/top1_best", "run_time_s", "student_params"):
        assert logged["summary"][key] == pytest.approx(summary[key]), key


@pytest.mark.slow
def test_run_time_adds_up_over_a_resumed_fit(in_tmp, teacher):
    fit(teacher, 1)
    first = json.loads((in_tmp / RUN / "summary.json").read_text())
    fit(teacher, 2, f"--ckpt_path={in_tmp / RUN / 'checkpoints/last.ckpt'}")
    second = json.loads((in_tmp / RUN / "summary.json").read_text())
    assert second["epochs"] == 2
    assert second["run_time_s"] > first["run_time_s"]
    hparams = (in_tmp / RUN / "hparams.yaml").read_text()  # the CSV logger got the identity too
    assert "student_params" in hparams and file_sha256(teacher) in hparams
