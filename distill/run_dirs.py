"""The on-disk layout of runs, ``<save_dir>/<name>/version_<n>/``: which runs finished, a run named
without its version, and the removal of what a start that failed left behind.

A run is **finished** when its fit reached its end (``trainer.max_epochs`` or ``max_steps``, or a
stopping callback): :class:`~distill.callbacks.run_summary.RunSummary` then writes ``summary.json``
(with the ``global_step`` reached), and ``checkpoints/last.ckpt`` holds that same step. A run stopped by
a signal or a crash has no ``summary.json``; one resumed after it finished and stopped again has a
``last.ckpt`` from a later step: neither is finished.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import MissingFileError
from .models.weights import load_checkpoint

SUMMARY = "summary.json"
LAST = Path("checkpoints/last.ckpt")
_VERSION = re.compile(r"version_(\d+)")
# What a start leaves before it has results: configs, Lightning's hparams.yaml, a metrics.csv header.
_START_FILES = re.compile(r"(config(\.resume-\d+)?\.yaml|hparams\.yaml|metrics\.csv)")


def versions(run_root: str | Path) -> list[Path]:
    """The ``version_<n>`` directories of ``run_root`` (``runs/<name>``), by increasing ``n``."""
    found = [p for p in Path(run_root).iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def is_finished(version_dir: str | Path) -> bool:
    """Whether the run's fit reached its end (module docstring)."""
    version_dir = Path(version_dir)
    summary, last = version_dir / SUMMARY, version_dir / LAST
    if not (summary.is_file() and last.is_file()):
        return False
    try:
        step = json.loads(summary.read_text()).get("global_step")
    except (OSError, ValueError):
        return False
    return step is not None and load_checkpoint(last, mmap=True).get("global_step") == step


def run_checkpoint(path: str, key: str = "teacher_weights") -> str:
    """The checkpoint file ``path`` names: itself if a file; ``<path>/checkpoints/last.ckpt`` if it is one
    run's ``version_<n>``; the ``last.ckpt`` of the newest finished version if it is a run directory
    without a version (``runs/cifar100/supervised/resnet32x4``). ``key`` names the argument in errors."""
    directory = Path(path)
    if not directory.is_dir():
        return path
    if _VERSION.fullmatch(directory.name):
        if not (directory / LAST).is_file():
            raise MissingFileError(f"{key}={path!r}: this run has no {LAST}: resume or finish it, or name a checkpoint")
        return str(directory / LAST)
    all_versions = versions(directory)
    finished = [v for v in all_versions if is_finished(v)]
    if not finished:
        found = ", ".join(v.name for v in all_versions) or "no version_<n>"
        raise MissingFileError(
            f"{key}={path!r}: no finished run there ({found}; a finished run has the {SUMMARY} its fit writes at "
            f"its end, and a {LAST} of that same step): train it to the end first, or name a checkpoint file"
        )
    return str(finished[-1] / LAST)


def created_dirs(path: str | Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    path = Path(path).absolute()
    return [p for p in (path, *path.parents) if not p.exists()]


def holds_results(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything but what a start writes before it has results: a checkpoint, a
    metric row, or any file that is not a config, ``hparams.yaml`` or ``metrics.csv``."""
    for path in run_dir.rglob("*"):
        if path.is_file() and (path.parent != run_dir or not _START_FILES.fullmatch(path.name)):
            return True
    metrics = run_dir / "metrics.csv"
    return metrics.is_file() and sum(1 for line in metrics.read_text().splitlines() if line.strip()) > 1


def remove_failed_start(created: list[Path]) -> bool:
    """Delete the run directory a failed start created (``created`` = :func:`created_dirs` before the
    start) and its new parents, unless the run left results; whether it was deleted."""
    if not created or not created[0].is_dir() or holds_results(created[0]):
        return False
    run_dir = created[0]
    for path in sorted(run_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    for directory in created:
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
    return True
