"""The documentation under docs/ says what the code does: knob tables match the constructors, every
module has an API entry, every paradigm page shows a figure the figure script draws, and nothing
in the repository cites a file outside it. (The site itself is built, strict, by ``make docs``.)"""

from __future__ import annotations

import importlib
import inspect
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
KNOBS = re.compile(r"<!-- knobs: ([\w.]+) -->\n((?:\|.*\n)+)")
ROW = re.compile(r"^\| `([^`]+)` \| `([^`]*)` \|")


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def knob_tables() -> dict[str, tuple[Path, dict[str, str]]]:
    """``{dotted class path: (page, {knob: default as written})}`` for every marked table."""
    tables = {}
    for page in pages():
        for path, body in KNOBS.findall(page.read_text()):
            rows = dict(m.groups() for line in body.splitlines() if (m := ROW.match(line)))
            assert path not in tables, f"{path} has knob tables in {tables[path][0]} and {page}"
            tables[path] = (page, rows)
    return tables


def load(dotted: str):
    module, name = dotted.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def plain(value):
    """A default as YAML would read it back: tuples as lists."""
    return [plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def test_the_docs_have_knob_tables_for_every_method_term_stage_plan_and_datamodule():
    documented = set(knob_tables())
    expected = {
        "distill.methods.base.DistillModule",
        "distill.methods.kd.OfflineKD",
        "distill.methods.pwkd.PWKD",
        "distill.methods.slimmable_supervised.SlimmableSupervised",
        "distill.callbacks.stages.StagePlan",
        "distill.methods.sskd.SSKD",
        "distill.methods.sokd.SOKD",
        "distill.methods.kr.KR",
        "distill.methods.supervised.Supervised",
        "distill.methods.dml.DML",
        "distill.data.cifar.CIFAR100DataModule",
        "distill.data.fashion_mnist.FashionMNISTDataModule",
    }
    from distill import losses

    expected |= {f"distill.losses.{name}" for name in losses.__all__ if name.endswith("Term") and name != "DistillTerm"}
    assert expected <= documented, f"no knob table for {sorted(expected - documented)}"


@pytest.mark.parametrize("dotted", sorted(knob_tables()))
def test_knob_table_lists_every_argument_with_its_default(dotted):
    page, rows = knob_tables()[dotted]
    parameters = {
        name: p.default
        for name, p in inspect.signature(load(dotted)).parameters.items()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    where = f"{page.relative_to(ROOT)}, table of {dotted}"
    assert rows.keys() == parameters.keys(), f"{where}: knobs {sorted(rows)} but arguments {sorted(parameters)}"
    for name, written in rows.items():
        default = parameters[name]
        expected = "required" if default is inspect.Parameter.empty else plain(default)
        shown = written if written == "required" else yaml.safe_load(written)
        assert shown == expected, f"{where}: {name} is `{written}`, the code's default is {default!r}"


def test_every_module_has_an_api_entry():
    documented = set()
    for page in (DOCS / "api").glob("*.md"):
        documented |= set(re.findall(r"^::: ([\w.]+)", page.read_text(), flags=re.M))
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in (ROOT / "distill").rglob("*.py")
        if path.name != "__init__.py"
    }
    assert modules <= documented, f"add a '::: <module>' line to a page of docs/api/ for {sorted(modules - documented)}"


@pytest.mark.parametrize("paradigm", ["pwkd", "sskd", "sokd", "kr"])
def test_paradigm_page_shows_a_figure_the_script_draws(paradigm):
    figures = re.findall(r"\]\(\.\./figures/([\w.]+\.png)\)", (DOCS / "paradigms" / f"{paradigm}.md").read_text())
    script = (DOCS / "_tools" / "figures.py").read_text()
    assert figures, f"docs/paradigms/{paradigm}.md shows no figure"
    assert all(f'"{name}"' in script for name in figures), f"{figures} are not all drawn by docs/_tools/figures.py"


def tracked_citations() -> str:
    """``git grep`` over the tracked files for citations of the internal notes outside the repository."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    patterns = ["METHODS" + ".md", "DESIGN" + ".md", "shared" + "/"]  # split: this file must not match itself
    args = ["git", "grep", "-n", *(arg for p in patterns for arg in ("-e", p))]
    found = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert found.returncode in (0, 1), found.stderr
    return found.stdout


def test_nothing_cites_a_file_outside_the_repository():
    found = tracked_citations()
    assert not found, f"citations of files outside the repository:\n{found}"
