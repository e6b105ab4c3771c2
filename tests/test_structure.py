"""The shape of the package: short functions with few parameters, no import cycles, pins that
agree."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "famjax"
MAX_PARAMS = 8
MAX_LINES = 60


def _modules() -> dict[str, ast.Module]:
  return {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts): ast.parse(
      path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}


def _n_params(node: ast.FunctionDef) -> int:
  args = node.args
  names = [a.arg for a in args.posonlyargs + args.args]
  n = len(names) + len(args.kwonlyargs) + bool(args.vararg) + bool(args.kwarg)
  return n - (names[:1] in (["self"], ["cls"]))


def test_no_function_is_long_or_takes_many_parameters():
  too_big = [f"{module}.{node.name} (line {node.lineno}): {_n_params(node)} parameters, "
             f"{node.end_lineno - node.lineno + 1} lines"
             for module, tree in _modules().items() for node in ast.walk(tree)
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
             and (_n_params(node) > MAX_PARAMS or node.end_lineno - node.lineno >= MAX_LINES)]
  assert not too_big, "\n".join(too_big)


def _imports(module: str, tree: ast.Module) -> set[str]:
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      found.add(node.module)
      found |= {f"{node.module}.{a.name}" for a in node.names}
  return found


def test_no_import_cycles():
  modules = _modules()
  graph = {m: sorted(i for i in _imports(m, tree) if i in modules and i != m)
           for m, tree in modules.items()}
  state, cycles = {}, []

  def visit(m, path):
    state[m] = "open"
    for n in graph[m]:
      if state.get(n) == "open":
        cycles.append(" -> ".join(path[path.index(n):] + [n]))
      elif n not in state:
        visit(n, path + [n])
    state[m] = "done"

  for m in graph:
    if m not in state:
      visit(m, [m])
  assert not cycles, cycles


def test_importing_famjax_leaves_matplotlib_alone(tmp_path):
  """The caller's matplotlib backend survives importing and plotting with famjax."""
  import os
  import subprocess
  import sys
  code = ("import matplotlib; before = matplotlib.get_backend(); "
          "import famjax.pipeline, famjax.analysis.plots, famjax.analysis.render; "
          "assert matplotlib.get_backend() == before, (before, matplotlib.get_backend())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "MPLBACKEND": "svg"}, cwd=PACKAGE.parent)
  assert out.returncode == 0, out.stderr[-2000:]


def test_the_tpu_extra_pins_the_libtpu_the_pinned_jax_asks_for():
  """`make check` installs libtpu alone at the tpu extra's pin, so that pin must be jax's own."""
  import configparser
  from importlib import metadata

  from packaging.requirements import Requirement
  setup = configparser.ConfigParser()
  setup.read(PACKAGE.parent / "setup.cfg")
  tpu_extra = {r.name: r for r in map(Requirement, setup["options.extras_require"]["tpu"].split())}
  jax_pin = next(r for r in map(Requirement, setup["options"]["install_requires"].split())
                 if r.name == "jax")
  assert tpu_extra["jax"].specifier == jax_pin.specifier
  assert metadata.version("jax") in jax_pin.specifier
  asked = next(r for r in map(Requirement, metadata.requires("jax"))
               if r.name == "libtpu" and r.marker and r.marker.evaluate({"extra": "tpu"}))
  (pinned,) = tpu_extra["libtpu"].specifier
  assert pinned.operator == "==" and pinned.version in asked.specifier, (pinned, asked)
