"""Each analysis notebook runs headless on a small results set and writes its figures.

The notebooks' first cell holds the parameters (RESULTS, OUT, ...); the test replaces
RESULTS/OUT there, as papermill would, and executes the rest unchanged with nbclient.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_analysis import write_results  # tests/ is on sys.path under pytest's default mode

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {
    "ppl_tables": ["ppl_by_configuration.png", "val_ppl_curves.png", "ppl_table.md",
                   "ppl_table.csv"],
    "pareto": ["pareto.png", "threshold_curves.png", "pareto_front.csv",
               "threshold_pareto.csv", "best_configurations.csv"],
    "importance": ["importance.png", "importance.csv", "parameter_effects.png",
                   "parallel_coordinates.png"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return write_results(tmp_path_factory.mktemp("results"), samples=10)


def run_notebook(name: str, results: Path | None = None,
                 cwd: Path = ROOT) -> nbformat.NotebookNode:
    """Execute analysis/NAME.ipynb in ``cwd``, with RESULTS replaced when ``results`` is given
    (as papermill would), else as shipped; return the executed notebook."""
    nb = nbformat.read(ROOT / "analysis" / f"{name}.ipynb", as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "code" and first.source.startswith("RESULTS = "), \
        "the first cell must set RESULTS (parameter cell)"
    if results is not None:
        lines = first.source.splitlines()
        lines[0] = f"RESULTS = {str(results)!r}"
        first.source = "\n".join(lines)
    client = NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_and_saves(name, results, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the kernel inherits it: headless figures
    out = results / "analysis"
    run_notebook(name, results)
    for file in NOTEBOOKS[name]:
        path = out / file
        assert path.exists() and path.stat().st_size > 0, f"{name} did not write {file}"
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_notebooks_are_stored_without_outputs():
    for name in NOTEBOOKS:
        nb = nbformat.read(ROOT / "analysis" / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, name
