"""Runs the Colab notebooks top to bottom and saves them with their outputs (`make notebooks`), so
that GitHub shows their plots; tests/test_notebooks.py runs them again and checks what is saved.

  .venv/bin/python tests/support/notebooks.py            # every notebook in colab/
  .venv/bin/python tests/support/notebooks.py 02         # those whose name contains "02"
  .venv/bin/python tests/support/notebooks.py --tidy     # only tidy what is saved (below)
"""

import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

COLAB = Path(__file__).resolve().parents[2] / "colab"
# A hang guard, not a speed target: on a busy 2-core CI runner notebook 01's training cell took
# over 180 s while the other test worker compiled its own programs.
CELL_TIMEOUT_S = 600


def notebooks() -> list[Path]:
  return sorted(COLAB.glob("*.ipynb"))


def execute(path: Path, workdir: Path) -> nbformat.NotebookNode:
  """The notebook at `path`, run top to bottom in `workdir` (its files go there)."""
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                 resources={"metadata": {"path": str(workdir)}}).execute()
  return notebook


def tidy(notebook: nbformat.NotebookNode) -> None:
  """What a reader need not see: execution timestamps (noise in every diff) and this machine's
  paths in warnings (the checkout's root and site-packages' location)."""
  root = f"{COLAB.parent}/"
  for cell in notebook.cells:
    cell.get("metadata", {}).pop("execution", None)
    for output in cell.get("outputs", []):
      if output.get("output_type") == "stream":
        output["text"] = re.sub(r"\S*/site-packages/", "site-packages/",
                                output["text"].replace(root, ""))


def main(names: list[str]) -> None:
  for path in notebooks():
    if names and not any(name in path.name for name in names):
      continue
    start = time.perf_counter()
    notebook = execute(path, COLAB)
    tidy(notebook)
    nbformat.write(notebook, path)
    print(f"{path.name}: ran and saved with its outputs ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
  if sys.argv[1:] == ["--tidy"]:
    for path in notebooks():
      saved = nbformat.read(path, as_version=4)
      tidy(saved)
      nbformat.write(saved, path)
  else:
    main(sys.argv[1:])
