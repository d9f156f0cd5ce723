"""experiments/notebooks/quickstart.ipynb runs top to bottom on a tiny checkpoint, so it cannot rot as the APIs move."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from decode_test import ROOT, train_tiny

NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "quickstart.ipynb")


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    workdir = train_tiny(tmp_path / "workdir")
    plot = tmp_path / "transitions.png"
    # The kernel inherits this environment: the parameter cell reads these, and XLA_FLAGS (conftest's fast CPU
    # compiles) carries over.
    monkeypatch.setenv("GATELOOP_WORKDIR", str(workdir))
    monkeypatch.setenv("GATELOOP_EVAL_BATCHES", "1")
    monkeypatch.setenv("GATELOOP_PLOT_PATH", str(plot))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), \
        "commit the notebook with cleared outputs"
    client = NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    try:
        client.execute()
    except Exception as e:  # nbclient's CellExecutionError carries the failing cell's traceback
        pytest.fail(f"quickstart.ipynb failed:\n{e}")
    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []))
    assert "gateloop on memory_horizon" in text and "eval: loss" in text and "correct:" in text
    assert "layer 0: mean |a|" in text
    assert plot.stat().st_size > 1000
