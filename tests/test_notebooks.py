"""The Colab notebooks run top to bottom (on this CPU) and are stored without outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

# A hang guard, not a speed target: on a busy 2-core CI runner notebook 01's training cell took
# over 180 s while the other test worker compiled its own programs.
CELL_TIMEOUT_S = 600
NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "colab").glob("*.ipynb"))


def test_there_are_notebooks():
  assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, tmp_path):
  """Each cell runs without error; the cell timeout only stops a hang (speed: docs/testing.md)."""
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
