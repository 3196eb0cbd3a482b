"""Results table of a directory of runs: rows teacher → student, columns methods.

    python -m distill.tools.results runs/ [--out results/] [--format md|csv]

Every run directory (``metrics.csv`` + ``config.yaml``, see :mod:`distill.tools.runs`) is identified
from its ``config.yaml``, never from its path: the dataset (``data.class_path``), the seed
(``seed_everything``) and what the method class says of its init arguments
(:meth:`~distill.methods.base.DistillModule.card`): its column (an ``OfflineKD`` run by its terms,
e.g. ``kd`` or ``crd+kd``, another method with terms by both, e.g. ``pwkd:kd``), its teacher and
student, and for a run without a teacher the columns it fills in the pairs of its network (a
from-scratch run: ``student`` and ``teacher``; DML: ``dml``; a slimmable teacher: ``slimmable
teacher``). A cell is the last-epoch val top-1 (%) as mean ± sample std over seeds, with the mean
best-epoch top-1 in brackets (the run's ``val/top1_best`` where it logged one, so SSKD's backbone
phases do not count). Of two runs with the same seed in a cell, the one with more epochs (then the
newer) counts. Runs whose configs differ in anything but the seed, paths and workers (model, data,
epochs and the stage plan ``stages``) are told apart by a label such as ``sskd (plan=joint)``.
``--out`` also writes ``results.csv`` (one line per cell) and the plots of
:mod:`distill.tools.plots`.

Every number says which split it is on: a run whose data holds a validation split out of the
training split (``val_fraction > 0``) validates on ``held-out val``; any other on the test split
(``val = test split``, the KD literature's CIFAR/ImageNet protocol, where the best epoch is chosen on
the test set). A dataset's table names its split in the heading, or every cell its own where they mix.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import warnings
from collections import defaultdict
from pathlib import Path

from ..methods.card import class_name as card_class_name
from ..methods.card import method_class
from .plots import save_plots
from .runs import find_runs, read_config, read_metrics, read_summary, series
from .table import HELD_OUT, TEST_SPLIT, Cell, Run, Table, row_label

FIRST_COLUMNS = ("teacher", "slimmable teacher", "student", "kd", "fitnet", "at", "sp", "rkd", "pkt", "crd", "dkd")
IGNORED_KEYS = ("teacher_weights", "weights", "init_weights", "data_dir", "num_workers", "verify_md5", "download")
COUNTED_KEYS = ("stage_teacher_weights",)  # lists of paths: only their number tells runs apart


def class_name(spec, path: Path, key: str) -> str:
    try:
        return card_class_name(spec)
    except ValueError:
        raise ValueError(f"{path / 'config.yaml'}: {key} has no class_path") from None


def flatten(tree, prefix: str = "") -> dict[str, str]:
    """``{"a.b.0.c": "value"}``: leaves as text (strings as they are, the rest, lists of plain values
    included, as JSON)."""
    plain_list = isinstance(tree, list) and not any(isinstance(item, (dict, list)) for item in tree)
    if isinstance(tree, dict) or (isinstance(tree, list) and not plain_list):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        return {k: v for key, value in items for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree if isinstance(tree, str) else json.dumps(tree, default=str)}


def settings(config: dict) -> dict[str, str]:
    """What makes two runs the same experiment: the model's and data's arguments, the epochs and the
    stage plan (``stages``: epochs and LR of PWKD's stages, SSKD's phases)."""
    trainer = config.get("trainer") or {}
    flat = flatten({"model": config.get("model"), "data": config.get("data"), "stages": config.get("stages")})
    flat["max_epochs"] = json.dumps(trainer.get("max_epochs"))
    for key, value in flat.items():
        if key.rsplit(".", 1)[-1] in COUNTED_KEYS and (files := json.loads(value)):
            flat[key] = f"{len(files)} files"
    return {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] not in IGNORED_KEYS}


def validation_split(data: dict) -> str:
    """``HELD_OUT`` when the data config holds a validation split out of the training split, else ``TEST_SPLIT``."""
    fraction = (data.get("init_args") or {}).get("val_fraction") or 0
    return HELD_OUT if float(fraction) > 0 else TEST_SPLIT


def load_run(path: Path) -> Run | None:
    """The :class:`Run` of a run directory; ``None`` (with a warning) when it has no ``val/top1`` yet."""
    config = read_config(path)
    for key in ("model", "data"):
        if not isinstance(config.get(key), dict):
            raise ValueError(f"{path / 'config.yaml'}: no {key!r} section")
    args = config["model"].get("init_args") or {}
    try:
        card = method_class(config["model"]["class_path"]).card(args)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path / 'config.yaml'}: model.init_args lacks {error} (the method's networks)") from error
    metrics = read_metrics(path)
    top1 = [v for _, v in series(metrics, "val/top1")]
    best = [v for _, v in series(metrics, "val/top1_best")]  # the method's own (SSKD: head phase only)
    if not top1:
        warnings.warn(f"{path}: no val/top1 logged yet; skipped", stacklevel=2)
        return None
    seed = config.get("seed_everything")
    return Run(
        path=path,
        dataset=class_name(config["data"], path, "data").removesuffix("DataModule").lower(),
        card=card,
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        last=100 * top1[-1],
        best=100 * (best[-1] if best else max(top1)),
        epochs=len(top1),
        max_epochs=(config.get("trainer") or {}).get("max_epochs"),
        seconds=read_summary(path).get("run_time_s"),
        val_split=validation_split(config["data"]),
        settings=settings(config),
        metrics=metrics,
    )


def collect(root: str | Path) -> list[Run]:
    """Every run under ``root`` that has logged a validation top-1."""
    runs = [run for path in find_runs(root) if (run := load_run(path)) is not None]
    if not runs:
        raise FileNotFoundError(f"no run with metrics.csv, config.yaml and a logged val/top1 under {root}")
    label_variants(runs)
    return runs


def label_variants(runs: list[Run]) -> None:
    """Append ``(key=value, ...)`` to the method of runs whose settings differ within one experiment."""
    groups = defaultdict(list)
    for run in runs:
        groups[run.dataset, run.teacher, run.student, run.card.column].append(run)
    for group in groups.values():
        keys = sorted({k for r in group for k in r.settings if len({r.settings.get(k) for r in group}) > 1})
        for run in group if keys else []:
            run.variant = " (" + ", ".join(f"{k.rsplit('.', 1)[-1]}={run.settings.get(k, '-')}" for k in keys) + ")"


def one_per_seed(runs: list[Run]) -> list[Run]:
    """Of runs sharing a seed, the one with the most epochs, then the most recent ``metrics.csv``."""
    chosen, unseeded = {}, []
    for run in runs:
        if run.seed is None:
            unseeded.append(run)
            continue
        old = chosen.get(run.seed)
        key = (run.epochs, (run.path / "metrics.csv").stat().st_mtime)
        if old is None or key > (old.epochs, (old.path / "metrics.csv").stat().st_mtime):
            chosen[run.seed] = run
    return [chosen[s] for s in sorted(chosen)] + unseeded


def build_table(runs: list[Run]) -> Table:
    pairs = sorted({(r.dataset, r.teacher, r.student) for r in runs if r.teacher})
    placed = defaultdict(list)
    for run in runs:
        card, variant = run.card, run.variant
        if card.teacher:
            placed[(run.dataset, card.teacher, card.student), run.method].append(run)
            continue
        targets = []  # a run without a teacher fills the pairs its network is the student or teacher of
        for column, side in ((card.student_column, 2), (card.teacher_column, 1)):
            if column:
                targets += [(p, column + variant) for p in pairs if p[0] == run.dataset and p[side] == card.student]
        own = (card.student_column or card.teacher_column or card.column) + variant
        for target in targets or [((run.dataset, None, card.student), own)]:
            placed[target].append(run)
    cells = {key: Cell(one_per_seed(group)) for key, group in placed.items()}
    rows = sorted({row for row, _ in cells}, key=lambda r: (r[0], r[1] or "", r[2]))
    columns = {}
    for dataset in sorted({r[0] for r in rows}):
        present = {c for (row, c) in cells if row[0] == dataset}
        columns[dataset] = sorted(present, key=column_order)
    return Table(rows, columns, cells)


def column_order(column: str) -> tuple[int, str]:
    """Teacher, student, then the anchor table's methods (docs/reproduction.md#reproducing-the-cifar-100-table),
    then the rest by name."""
    base = column.split(" (")[0]
    return (FIRST_COLUMNS.index(base) if base in FIRST_COLUMNS else len(FIRST_COLUMNS), column)


def format_accuracy(cell: Cell | None) -> str:
    if cell is None:
        return ""
    std = cell.std("last")
    text = f"{cell.mean('last'):.2f}" + (f" ± {std:.2f}" if std is not None else "") + f" [{cell.mean('best'):.2f}]"
    return text + ("*" if cell.unfinished else "")


def format_time(cell: Cell | None) -> str:
    seconds = None if cell is None else cell.mean("seconds")
    if seconds is None:
        return "" if cell is None else f"n/a ×{cell.n}"
    text = (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.0f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )
    return f"{text} ×{cell.n}"


def dataset_splits(table: Table, dataset: str) -> set[str]:
    """The validation splits of a dataset's cells (one where every run validated on the same split)."""
    return {cell.val_splits for (row, _), cell in table.cells.items() if row[0] == dataset}


def to_markdown(table: Table) -> str:
    lines = [
        "Val top-1 (%): last epoch, mean ± sample std over seeds [mean of the best epoch]; "
        "* counts unfinished runs. Run time: mean per run × runs. "
        f"'{HELD_OUT}': validated on images held out of the training split; "
        f"'{TEST_SPLIT}': validated (and the best epoch chosen) on the test split.",
    ]
    for dataset, columns in table.columns.items():
        rows = [r for r in table.rows if r[0] == dataset]
        splits = dataset_splits(table, dataset)

        def accuracy(cell: Cell | None, mixed: bool = len(splits) > 1) -> str:
            text = format_accuracy(cell)
            return f"{text} ({cell.val_splits})" if cell is not None and mixed else text

        heading = f"{dataset}: val top-1 (%)" + (f", {next(iter(splits))}" if len(splits) == 1 else "")
        for title, fmt in ((heading, accuracy), (f"{dataset}: run time", format_time)):
            lines += ["", f"### {title}", "", "| teacher → student | " + " | ".join(columns) + " |"]
            lines.append("|---" * (len(columns) + 1) + "|")
            for row in rows:
                lines.append(
                    f"| {row_label(row)} | " + " | ".join(fmt(table.cells.get((row, c))) for c in columns) + " |"
                )
    return "\n".join(lines) + "\n"


CSV_FIELDS = (
    "dataset",
    "teacher",
    "student",
    "method",
    "n",
    "seeds",
    "last_mean",
    "last_std",
    "best_mean",
    "best_std",
    "seconds_mean",
    "val_split",
    "unfinished",
    "runs",
)


def to_csv(table: Table, root: str | Path | None = None) -> str:
    """One line per cell; accuracies in percent, ``runs`` relative to ``root``."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()

    def num(value):
        return "" if value is None else round(value, 4)

    for row in table.rows:
        for column in table.columns[row[0]]:
            cell = table.cells.get((row, column))
            if cell is None:
                continue
            writer.writerow(
                {
                    "dataset": row[0],
                    "teacher": row[1] or "",
                    "student": row[2],
                    "method": column,
                    "n": cell.n,
                    "seeds": ";".join("" if r.seed is None else str(r.seed) for r in cell.runs),
                    "last_mean": num(cell.mean("last")),
                    "last_std": num(cell.std("last")),
                    "best_mean": num(cell.mean("best")),
                    "best_std": num(cell.std("best")),
                    "seconds_mean": num(cell.mean("seconds")),
                    "val_split": cell.val_splits,
                    "unfinished": cell.unfinished,
                    "runs": ";".join(str(r.path.relative_to(root) if root else r.path) for r in cell.runs),
                }
            )
    return out.getvalue()


def write_results(table: Table, out: str | Path, root: str | Path | None = None) -> list[Path]:
    """``results.md``, ``results.csv`` and the plots of ``table`` written to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(to_markdown(table))
    (out / "results.csv").write_text(to_csv(table, root))
    return [out / "results.md", out / "results.csv", *save_plots(table, out)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", help="directory searched for runs (e.g. runs/)")
    parser.add_argument("--out", help="also write results.md, results.csv and PNG plots here")
    parser.add_argument("--format", choices=("md", "csv"), default="md", help="what to print (default md)")
    args = parser.parse_args(argv)
    table = build_table(collect(args.runs))
    print(to_markdown(table) if args.format == "md" else to_csv(table, args.runs), end="")
    if args.out:
        for path in write_results(table, args.out, args.runs):
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
