"""PNG plots of a results table, one pair (table row) per figure, drawn without pyplot (Agg canvas).

- ``val_top1_<dataset>_<teacher>-<student>.png``: validation top-1 per epoch of every method (mean
  over seeds, the band from the lowest to the highest seed), with stages shaded in alternating bands
  where a run logs the stage plan's ``stage`` metric (PWKD's widths, SSKD's phases).
- ``lr_<...>.png``: the learning rate per optimiser step of every method (its first run).
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from matplotlib.figure import Figure

from .runs import series, stage_starts
from .table import Cell, Row, Table, row_label


def row_slug(row: Row) -> str:
    name = f"{row[0]}_{row[1]}-{row[2]}" if row[1] else f"{row[0]}_{row[2]}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def method_cells(table: Table, row: Row) -> dict[str, Cell]:
    """The row's cells to plot: every method and the student from scratch, not the teacher."""
    return {
        c: table.cells[row, c] for c in table.columns[row[0]] if (row, c) in table.cells and not c.startswith("teacher")
    }


def shade_stages(ax, starts: list[int], end: float) -> None:
    """Alternating bands between stage starts (epochs), plus a dotted line at every start."""
    edges = [-0.5] + [s - 0.5 for s in starts] + [end + 0.5]
    for i, (a, b) in enumerate(zip(edges, edges[1:])):
        if i % 2:
            ax.axvspan(a, b, color="0.5", alpha=0.12, lw=0)
    for s in starts:
        ax.axvline(s - 0.5, color="0.4", ls=":", lw=0.8)


def plot_mean_curve(ax, runs: list, label: str, band: str = "range", key: str = "val/top1") -> tuple[set[int], int]:
    """The mean over ``runs`` of ``key`` (a fraction, drawn in %) per epoch, with a band from the lowest to
    the highest run (``band="range"``) or of ±1 sample std (``"std"``). Returns the runs' stage starts
    and the last epoch drawn."""
    per_epoch: dict[int, list[float]] = {}
    starts: set[int] = set()
    for run in runs:
        for epoch, value in series(run.metrics, key):
            per_epoch.setdefault(epoch, []).append(100 * value)
        starts.update(stage_starts(run.metrics))
    epochs = sorted(per_epoch)
    means = [statistics.fmean(per_epoch[e]) for e in epochs]
    (line,) = ax.plot(epochs, means, label=f"{label} (n={len(runs)})")
    if len(runs) > 1:
        if band == "std":
            spread = [statistics.stdev(per_epoch[e]) if len(per_epoch[e]) > 1 else 0.0 for e in epochs]
            low, high = [m - s for m, s in zip(means, spread)], [m + s for m, s in zip(means, spread)]
        else:
            low, high = [min(per_epoch[e]) for e in epochs], [max(per_epoch[e]) for e in epochs]
        ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, lw=0)
    return starts, max(epochs, default=0)


def val_top1_figure(table: Table, row: Row) -> Figure:
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    starts, last_epoch = set(), 0
    for method, cell in method_cells(table, row).items():
        cell_starts, cell_end = plot_mean_curve(ax, cell.runs, method)
        starts, last_epoch = starts | cell_starts, max(last_epoch, cell_end)
    shade_stages(ax, sorted(starts), last_epoch)
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title=row_label(row) + (" (stages shaded)" if starts else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def lr_figure(table: Table, row: Row) -> Figure:
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.subplots()
    for method, cell in method_cells(table, row).items():
        rows = cell.runs[0].metrics
        key = "lr_step" if any("lr_step" in r for r in rows) else "lr"
        points = series(rows, key, by="step")
        ax.plot([s for s, _ in points], [v for _, v in points], label=method)
    ax.set(xlabel="optimiser step", ylabel="learning rate", title=f"{row_label(row)}: LR schedule")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def save_plots(table: Table, out: str | Path) -> list[Path]:
    """Both figures of every row of ``table`` as PNGs in ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in table.rows:
        if not method_cells(table, row):
            continue
        for name, draw in (("val_top1", val_top1_figure), ("lr", lr_figure)):
            path = out / f"{name}_{row_slug(row)}.png"
            draw(table, row).savefig(path, dpi=110)
            paths.append(path)
    return paths
