#!/usr/bin/env bash
# famjax installed as a user installs it (`make check-install`): the wheel from `make dist` into a
# fresh venv whose jax, jaxlib and numpy are already there at famjax's floors, with those three as
# pip constraints; they must stay as they were, and so must an environment's jax, jaxlib and numpy
# one release behind the lock under a plain `pip install`. Then, from an empty directory, the
# `famjax` command runs a shortened tiny study and fits its CSV, and notebook 02 runs top to
# bottom in the floors venv. Prints each step's time.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
floor() { sed -n "s/^ *$1>=\([0-9.]*\)$/\1/p" "$ROOT/setup.cfg"; }
PREINSTALLED="jax==$(floor jax) jaxlib==$(floor jax) numpy==$(floor numpy)"
step() { echo "--- $1 ($(( SECONDS - START )) s so far)"; }
START=$SECONDS

step "a venv that already has $PREINSTALLED"
"$PYTHON" -m venv "$WORK/venv"
VENV="$WORK/venv/bin"
"$VENV/pip" install -q $PREINSTALLED
BEFORE="$("$VENV/pip" freeze | grep -iE '^(jax|jaxlib|numpy)==' | sort)"

step "pip install the wheel, the venv's jax, jaxlib and numpy as constraints (as the notebooks do)"
echo "$BEFORE" > "$WORK/keep.txt"
"$VENV/pip" install -q "$ROOT"/dist/famjax-*.whl -c "$WORK/keep.txt"
AFTER="$("$VENV/pip" freeze | grep -iE '^(jax|jaxlib|numpy)==' | sort)"
[ "$BEFORE" = "$AFTER" ] || { echo "the wheel replaced: $BEFORE -> $AFTER"; exit 1; }
echo "kept: $(echo $AFTER)"

# Without constraints pip keeps what the newest releases of famjax's dependencies accept (flax
# 0.12.8 needs jax >= 0.10): an environment one minor release behind the lock keeps its own.
BEHIND="jax==0.10.0 jaxlib==0.10.0 numpy==2.3.5"
step "plain pip install of the wheel where $BEHIND are installed"
"$PYTHON" -m venv "$WORK/behind"
"$WORK/behind/bin/pip" install -q $BEHIND
"$WORK/behind/bin/pip" install -q "$ROOT"/dist/famjax-*.whl
KEPT="$("$WORK/behind/bin/pip" freeze | grep -iE '^(jax|jaxlib|numpy)==' | sort | tr '\n' ' ')"
[ "$KEPT" = "jax==0.10.0 jaxlib==0.10.0 numpy==2.3.5 " ] || { echo "replaced: $KEPT"; exit 1; }
echo "kept: $KEPT"

mkdir "$WORK/empty" && cd "$WORK/empty"
step "famjax study --config=tiny, shortened, from an empty directory"
"$VENV/famjax" study --config=tiny --outdir=study --config.study.budgets="(2e10,4e10)" \
  --config.study.sizes_per_budget=3 --config.study.bootstrap=100 --compilation_cache=none | tail -4

step "famjax fit of the study's CSV"
"$VENV/famjax" fit --data=study/data/familial.csv --bootstrap=100 --out=fit.json | tail -3

step "notebook 02 in that venv"
"$VENV/pip" install -q nbclient ipykernel
"$VENV/python" - "$ROOT/colab/02_fitter_as_a_jax_function.ipynb" <<'PY'
import sys, nbformat
from nbclient import NotebookClient
notebook = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
print("notebook 02 ran:", sum(c.cell_type == "code" for c in notebook.cells), "code cells")
PY
step "done"
