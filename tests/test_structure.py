"""The shape of the package: short functions with few parameters, no import cycles, pins that
agree."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "famjax"
MAX_PARAMS = 8
MAX_LINES = 60


def _modules() -> dict[str, ast.Module]:
  """{dotted name: syntax tree}; a package's __init__.py under the package's own name."""
  return {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(
      ".__init__"): ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}


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
  """What a module imports; `from package import submodule` imports the submodule alone (a
  package's __init__ that re-exports its modules is not imported back by them)."""
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      package = PACKAGE.parent / node.module.replace(".", "/")
      submodules = {a.name for a in node.names if (package / f"{a.name}.py").exists()
                    or (package / a.name / "__init__.py").exists()}
      if len(submodules) < len(node.names):
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


# Each package imports only from packages on a lower layer (or from itself): the house's floors.
LAYERS = {"common": 0, "scaling": 1, "model": 1, "data": 1, "hf": 2, "decode": 2, "train": 3,
          "hardware": 4, "study": 5, "presets": 6, "analysis": 6, "evaluation": 6, "pipeline": 7,
          "commands": 8, "cli": 9, "__main__": 10}


def _package(module: str) -> str:
  return module.split(".")[1] if module.count(".") else "famjax"


def test_every_import_points_down_the_layers():
  modules = _modules()
  assert {_package(m) for m in modules} - {"famjax"} <= set(LAYERS), "a new package"
  upward = [f"{m} imports {i}" for m, tree in modules.items() for i in _imports(m, tree)
            if i in modules and _package(m) in LAYERS and _package(i) in LAYERS
            and _package(i) != _package(m) and LAYERS[_package(i)] >= LAYERS[_package(m)]]
  assert not upward, upward


def test_the_fitter_imports_nothing_of_famjax_outside_it():
  """famjax.scaling is importable without the training stack: its own modules only."""
  modules = _modules()
  outside = [f"{m} imports {i}" for m, tree in modules.items() if _package(m) == "scaling"
             for i in _imports(m, tree) if i.startswith("famjax.") and _package(i) != "scaling"]
  assert not outside, outside


def test_only_the_fitter_sets_the_xla_scheduler_flag():
  """`import famjax` (and training) leaves XLA_FLAGS alone; importing the fitter adds its one
  setting, and an explicit setting of that flag wins."""
  import os
  import subprocess
  import sys
  flag = "--xla_cpu_enable_concurrency_optimized_scheduler"
  code = ("import os, famjax, famjax.train.loop; before = os.environ.get('XLA_FLAGS', ''); "
          "import famjax.scaling.fitting; print(repr(before), repr(os.environ['XLA_FLAGS']))")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=PACKAGE.parent)
  assert out.stdout.split() == ["''", f"'{flag}=false'"], out.stderr[-2000:]
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**env, "XLA_FLAGS": f"{flag}=true"}, cwd=PACKAGE.parent)
  assert out.stdout.split() == [f"'{flag}=true'"] * 2, out.stderr[-2000:]


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


def test_the_lock_pins_the_libtpu_its_jax_asks_for():
  """`make check` installs libtpu alone at the lock's pin, so that pin must be what the locked jax's
  `tpu` extra asks for; and the lock holds the jax this environment runs."""
  from importlib import metadata

  from packaging.requirements import Requirement
  lock = dict(line.split("==") for line in (PACKAGE.parent / "requirements-lock.txt").read_text()
              .splitlines() if line and not line.startswith("#"))
  if lock["jax"] != metadata.version("jax"):
    import pytest
    pytest.skip(f"this environment runs jax {metadata.version('jax')}, not the lock's (floors)")
  asked = next(r for r in map(Requirement, metadata.requires("jax"))
               if r.name == "libtpu" and r.marker and r.marker.evaluate({"extra": "tpu"}))
  assert lock["libtpu"] in asked.specifier, (lock["libtpu"], asked)


def test_every_dependency_is_a_range_that_the_lock_satisfies():
  """setup.cfg's requirements are ranges (no exact pins); the lock's versions lie within them."""
  import configparser

  from packaging.requirements import Requirement
  setup = configparser.ConfigParser()
  setup.read(PACKAGE.parent / "setup.cfg")
  lock = dict(line.split("==") for line in (PACKAGE.parent / "requirements-lock.txt").read_text()
              .splitlines() if line and not line.startswith("#"))
  lock = {name.lower().replace("_", "-"): version for name, version in lock.items()}
  requirements = [Requirement(line) for section in ("install_requires",) for line in
                  setup["options"][section].split("\n") if line.strip()]
  requirements += [Requirement(line) for extra in setup["options.extras_require"].values()
                   for line in extra.split("\n") if line.strip()]
  pinned = [str(r) for r in requirements if any(s.operator == "==" for s in r.specifier)]
  assert not pinned, pinned
  outside = [f"{r} (lock {lock[r.name.lower()]})" for r in requirements
             if r.name.lower() in lock and lock[r.name.lower()] not in r.specifier]
  assert not outside, outside


def structure_table() -> str:
  """The packages by layer, their modules, lines and the packages each imports: docs/design.md's
  table, printed by `python tests/test_structure.py`."""
  modules = _modules()
  path = lambda m: PACKAGE.parent / (m.replace(".", "/") + ".py")
  lines = {m: len((path(m) if path(m).exists() else path(m + ".__init__").parent / "__init__.py")
                  .read_text().splitlines()) for m in modules}
  rows = ["| layer | package | modules | lines | imports from |", "|---|---|---|---|---|"]
  arrows = set()
  for name, layer in sorted(LAYERS.items(), key=lambda kv: (-kv[1], kv[0])):
    own = [m for m in modules if _package(m) == name]
    uses = sorted({_package(i) for m in own for i in _imports(m, modules[m])
                   if i in modules and _package(i) not in (name, "famjax")})
    arrows |= {(name, u) for u in uses}
    rows.append(f"| {layer} | {name} | {len(own)} | {sum(lines[m] for m in own):,} | "
                f"{', '.join(uses) or '-'} |")
  rows.append(f"\n{len(modules)} modules, {sum(lines.values()):,} lines, {len(arrows)} package "
              "imports, none pointing up a layer, no import cycle.")
  return "\n".join(rows)


if __name__ == "__main__":
  print(structure_table())
