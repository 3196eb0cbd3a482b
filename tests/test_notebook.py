"""notebooks/results.ipynb runs top to bottom on a small directory of runs (so it never rots)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_results import write_fake_runs

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks/results.ipynb"


@pytest.mark.slow
def test_results_notebook_executes_and_shows_table_and_plots(tmp_path, monkeypatch):
    runs, out = write_fake_runs(tmp_path / "runs"), tmp_path / "results"
    monkeypatch.setenv("DISTILL_RUNS", str(runs))
    monkeypatch.setenv("DISTILL_RESULTS", str(out))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stored clean
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "| resnet56 → resnet20 | 76.00 [76.00] | 60.00 [61.00]* | 67.00 ± 1.41 [68.00] |" in markdown
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # val top-1 and LR of the one pair
    assert (out / "results.csv").is_file()
