"""The results table's types: a run read back from disk, a cell of runs over seeds, the table."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..methods.card import RunCard

HELD_OUT, TEST_SPLIT = "held-out val", "val = test split"  # what a run's val/top1 was measured on


@dataclass
class Run:
    """One run directory, identified from its config; accuracies in percent."""

    path: Path
    dataset: str
    card: RunCard  # how the method names and places the run
    seed: int | None
    last: float
    best: float
    epochs: int
    max_epochs: int | None
    seconds: float | None
    val_split: str = TEST_SPLIT  # HELD_OUT or TEST_SPLIT
    settings: dict = field(default_factory=dict)  # flattened config used to tell variants apart
    variant: str = ""  # " (key=value, ...)" where runs of one experiment differ in settings
    metrics: list = field(default_factory=list, repr=False)

    @property
    def method(self) -> str:
        """The run's table label: the method's column and its variant."""
        return self.card.column + self.variant

    @property
    def teacher(self) -> str | None:
        return self.card.teacher

    @property
    def student(self) -> str:
        return self.card.student

    @property
    def finished(self) -> bool:
        return self.max_epochs is None or self.max_epochs < 0 or self.epochs >= self.max_epochs


@dataclass
class Cell:
    runs: list[Run]

    @property
    def n(self) -> int:
        return len(self.runs)

    def mean(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.runs if getattr(r, attr) is not None]
        return statistics.fmean(values) if values else None

    def std(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.runs]
        return statistics.stdev(values) if len(values) > 1 else None

    @property
    def unfinished(self) -> int:
        return sum(not r.finished for r in self.runs)

    @property
    def val_splits(self) -> str:
        return " + ".join(sorted({r.val_split for r in self.runs}))


Row = tuple  # (dataset, teacher or None, student); teacher-less runs with no pair get a row of their own


@dataclass
class Table:
    rows: list[Row]
    columns: dict[str, list[str]]  # per dataset
    cells: dict[tuple[Row, str], Cell]


def row_label(row: Row) -> str:
    return f"{row[1]} → {row[2]}" if row[1] else row[2]
