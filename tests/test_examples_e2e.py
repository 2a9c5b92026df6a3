"""The notebooks in examples/ execute from top to bottom (jupytext -> nbclient, a real kernel)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.e2e
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
  import jupytext
  import nbclient
  monkeypatch.setenv("MPLBACKEND", "Agg")
  notebook = jupytext.read(path)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                    for o in cell.get("outputs", []))
  assert "Traceback" not in outputs
  assert "IAM-On" in outputs and "s in all" in outputs
