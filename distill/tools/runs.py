"""Read what a run left on disk: the CSV logger's ``metrics.csv`` and its checkpoints."""
from __future__ import annotations

import csv
import math
from pathlib import Path


def latest_version(run_root: str | Path) -> Path:
    """The newest ``version_<n>`` directory under ``run_root`` (``runs/<name>``)."""
    root = Path(run_root)
    versions = sorted(root.glob("version_*"), key=lambda p: int(p.name.split("_")[-1]))
    if not versions:
        raise FileNotFoundError(f"no version_<n> directory under {root}")
    return versions[-1]


def read_metrics(version_dir: str | Path) -> list[dict[str, float]]:
    """Rows of ``metrics.csv`` with empty cells dropped and values as floats."""
    path = Path(version_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {version_dir} a CSV-logged run?")
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def series(rows: list[dict[str, float]], key: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of every row that logged ``key``."""
    return [(int(r.get("epoch", -1)), r[key]) for r in rows if key in r and not math.isnan(r[key])]


def summary(version_dir: str | Path, key: str = "val/top1") -> dict[str, float]:
    """Last and best value of ``key`` over a run (accuracies as percentages)."""
    values = [v for _, v in series(read_metrics(version_dir), key)]
    if not values:
        raise KeyError(f"{version_dir}: no {key!r} logged")
    return {"last": 100 * values[-1], "best": 100 * max(values)}
