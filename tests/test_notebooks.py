"""The Colab notebooks: saved with their outputs (`make notebooks`), each first cell installing
famjax beside the runtime's own jax, and each running top to bottom on this CPU."""

import json
import re

import nbformat
import pytest

from support import notebooks

NOTEBOOKS = notebooks.notebooks()


def test_there_are_notebooks():
  assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_saved_with_their_outputs_and_no_error(path):
  """What GitHub shows: every code cell ran, in order, and none failed."""
  notebook = nbformat.read(path, as_version=4)
  counts = [cell.execution_count for cell in notebook.cells if cell.cell_type == "code"]
  assert counts == list(range(1, len(counts) + 1)), f"{path.name}: run `make notebooks`"
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not [o for o in cell.outputs if o.output_type == "error"], path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_install_cell_keeps_the_runtimes_jax(path):
  """The first code cell names famjax's source in one variable and pins the runtime's jax,
  jaxlib and numpy as pip constraints, so that installing famjax replaces none of them."""
  first = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
  assert re.search(r'^FAMJAX = "famjax"', first.source, re.M)
  assert '("jax", "jaxlib", "numpy")' in first.source and '"-c"' in first.source


def test_the_readme_links_each_notebook_to_colab():
  readme = (notebooks.COLAB.parent / "README.md").read_text()
  for path in NOTEBOOKS:
    assert f"colab.research.google.com/github/famjax/famjax/blob/main/colab/{path.name}" in readme


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, tmp_path):
  """Each cell runs without error; the cell timeout only stops a hang (speed: docs/testing.md)."""
  notebook = notebooks.execute(path, tmp_path)
  assert json.loads(nbformat.writes(notebook))["cells"]
