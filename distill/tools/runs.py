"""Read what a run left on disk: the CSV logger's ``metrics.csv``, the resolved configs of its segments
(``config.yaml``, ``config.resume-<n>.yaml``), :class:`~distill.callbacks.run_summary.RunSummary`'s
``summary.json``, and W&B offline runs.

A resumed run appends to its ``metrics.csv``, so an epoch (or step) can appear twice; :func:`series`
keeps the last value logged for each.
"""

from __future__ import annotations

import csv
import json
import math
import re
import struct
from pathlib import Path

import yaml

STAGE_KEY = "stage"  # the per-epoch metric the StagePlan logs in multi-stage runs


def latest_version(run_root: str | Path) -> Path:
    """The newest ``version_<n>`` directory under ``run_root`` (``runs/<name>``)."""
    root = Path(run_root)
    versions = sorted(root.glob("version_*"), key=lambda p: int(p.name.split("_")[-1]))
    if not versions:
        raise FileNotFoundError(f"no version_<n> directory under {root}")
    return versions[-1]


def find_runs(root: str | Path) -> list[Path]:
    """Every run directory under ``root``: one holding both ``metrics.csv`` and ``config.yaml``."""
    return sorted(p.parent for p in Path(root).rglob("metrics.csv") if (p.parent / "config.yaml").is_file())


def read_metrics(version_dir: str | Path) -> list[dict[str, float]]:
    """Rows of ``metrics.csv`` with empty cells dropped and values as floats."""
    path = Path(version_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {version_dir} a CSV-logged run?")
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def config_files(version_dir: str | Path) -> list[Path]:
    """The resolved config of every segment of a run, in order: ``config.yaml``, then ``config.resume-<n>.yaml``."""
    version_dir = Path(version_dir)
    resumes = [p for p in version_dir.glob("config.resume-*.yaml") if re.fullmatch(r"config\.resume-\d+\.yaml", p.name)]
    first = [version_dir / "config.yaml"] if (version_dir / "config.yaml").is_file() else []
    return first + sorted(resumes, key=lambda p: int(p.name.split("-")[1].split(".")[0]))


def read_config(version_dir: str | Path) -> dict:
    """The resolved LightningCLI config of a run as it is now: its last segment's (``config.resume-<n>.yaml``
    of the largest ``n``, else ``config.yaml``; a resume may only change what does not define the
    experiment, e.g. ``trainer.max_epochs``)."""
    files = config_files(version_dir)
    path = files[-1] if files else Path(version_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: was {version_dir} written by `distill fit`?")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(config).__name__}")
    return config


def read_summary(version_dir: str | Path) -> dict:
    """``summary.json`` written at the end of a fit by ``RunSummary``; ``{}`` when there is none."""
    path = Path(version_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def series(rows: list[dict[str, float]], key: str, by: str = "epoch") -> list[tuple[int, float]]:
    """``(epoch, value)`` (or ``(step, value)`` with ``by="step"``) of every row that logged ``key``,
    in order, keeping the last value of an epoch/step logged twice (a resumed run)."""
    values = {int(r.get(by, -1)): r[key] for r in rows if key in r and not math.isnan(r[key])}
    return sorted(values.items())


def summary(version_dir: str | Path, key: str = "val/top1") -> dict[str, float]:
    """Last and best value of ``key`` over a run (accuracies as percentages)."""
    values = [v for _, v in series(read_metrics(version_dir), key)]
    if not values:
        raise KeyError(f"{version_dir}: no {key!r} logged")
    return {"last": 100 * values[-1], "best": 100 * max(values)}


def stage_starts(rows: list[dict[str, float]]) -> list[int]:
    """Epochs at which a new stage begins (the first epoch excluded); ``[]`` for a single-stage run."""
    stages = series(rows, STAGE_KEY)
    return [e for (_, a), (e, b) in zip(stages, stages[1:]) if a != b]


# ---- W&B offline runs ------------------------------------------------------------------------
_BLOCK, _HEADER = 32768, 7  # the .wandb transaction log is a LevelDB-style log of protobuf records


def wandb_records(path: str | Path):
    """The protobuf ``Record`` s of a W&B transaction log (``run-<id>.wandb``), in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log (no ':W&B' header)")
    pos, chunks = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        payload = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0:
            break
        chunks = payload if kind in (1, 2) else chunks + payload  # full, first | middle, last
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(chunks)


def read_wandb_run(run_dir: str | Path) -> dict:
    """``{"config": {...}, "summary": {...}, "history": [rows]}`` of a W&B run directory
    (``runs/wandb/offline-run-*``), read from its transaction log without any network."""
    logs = sorted(Path(run_dir).glob("run-*.wandb"))
    if not logs:
        raise FileNotFoundError(f"no run-*.wandb transaction log in {run_dir}")
    config, summary, history = {}, {}, []

    def items(updates) -> dict:
        return {".".join(u.nested_key) if u.nested_key else u.key: json.loads(u.value_json) for u in updates}

    for record in wandb_records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":  # wandb.init(config=...) arrives with the run record
            config.update(items(record.run.config.update))
        elif kind == "config":
            config.update(items(record.config.update))
        elif kind == "summary":
            summary.update(items(record.summary.update))
        elif kind == "history":
            history.append(items(record.history.item))
    return {"config": config, "summary": summary, "history": history}
