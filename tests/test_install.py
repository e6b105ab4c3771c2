"""famjax as a user installs it: the wheel and the sdist (famjax only, complete metadata, the
`famjax` command), and the fitter alone in an environment that has only jax, jaxlib, jaxopt,
optax, numpy and scipy. Each builds or installs into a fresh directory (slow)."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIGHT = ("jax", "jaxlib", "jaxopt", "optax", "numpy", "scipy")
TRAINING_STACK = ("flax", "orbax", "grain", "datasets", "matplotlib", "pandas", "tensorboardX",
                  "tokenizers", "pyarrow", "ml_collections")


def run(*argv, **kwargs):
  out = subprocess.run(argv, capture_output=True, text=True, timeout=900, **kwargs)
  assert out.returncode == 0, (argv, out.stdout[-2000:], out.stderr[-3000:])
  return out


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
  out = tmp_path_factory.mktemp("dist")
  run(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(ROOT))
  return out


@pytest.mark.slow
def test_the_wheel_holds_famjax_only_with_its_command_and_metadata(dist):
  (wheel,) = dist.glob("famjax-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  assert {n.split("/")[0] for n in names} == {"famjax", wheel.name.split("-py3")[0] + ".dist-info"}
  assert "famjax/presets/isoflop.py" in names and "famjax/commands/study.py" in names
  info = wheel.name.split("-py3")[0] + ".dist-info"
  entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
  assert "famjax = famjax.cli:main" in entry_points
  metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
  for field in ("Author: The famjax authors", "Requires-Python: >=3.11", "Project-URL: ",
                "Classifier: Programming Language :: Python :: 3.11", "License-File: LICENSE"):
    assert field in metadata, field
  assert "Requires-Dist: jax>=" in metadata
  assert not re.search(r"^Requires-Dist: [^;\n]*==", metadata, re.M), "an exact pin"
  run(sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir()))


@pytest.mark.slow
def test_the_sdist_builds_the_same_wheel(dist, tmp_path):
  (sdist,) = dist.glob("famjax-*.tar.gz")
  run(sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(sdist))
  (again,), (wheel,) = tmp_path.glob("*.whl"), dist.glob("*.whl")
  assert sorted(zipfile.ZipFile(again).namelist()) == sorted(zipfile.ZipFile(wheel).namelist())


LIGHT_FIT = """
import sys
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
from famjax.scaling import bootstrap, compare, fitting, laws, leverage
truth = laws.to_log_params(laws.PAPER_FAMILIAL)
rng = np.random.default_rng(0)
n = np.repeat(np.geomspace(1e8, 1e10, 6), 12); d = np.tile(np.geomspace(1e10, 1e12, 4), 18)
g = np.tile([1.0, 2.0, 4.0], 24)
clean = np.asarray(laws.loss(laws.FAMILIAL, truth, fitting.as_data({"N": n, "D": d, "G": g})))
data = {"N": n, "D": d, "G": g, "loss": clean * np.exp(0.003 * rng.standard_normal(72))}
result = fitting.fit(fitting.Problem.of(laws.FAMILIAL, data))
boot = bootstrap.bootstrap(result, fitting.Resampling(1000, key=0))
lo, hi = boot.ci95["gamma"]
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1].split(",")))
print(f"gamma {laws.to_natural_params(result.params)['gamma']:.4f} [{lo:.4f}, {hi:.4f}]",
      "failed", boot.failed, "loaded", heavy)
"""


@pytest.mark.slow
def test_the_fitter_alone_fits_the_paper_law_with_a_bootstrap(tmp_path):
  """A venv with only the light fitter's packages (at the lock's versions) and famjax without its
  dependencies: the README's one install line."""
  venv = tmp_path / "venv"
  run(sys.executable, "-m", "venv", str(venv))
  python = str(venv / "bin" / "python")
  run(python, "-m", "pip", "install", "-q", "-c", str(ROOT / "requirements-lock.txt"), *LIGHT)
  run(python, "-m", "pip", "install", "-q", "--no-deps", str(ROOT))
  out = run(python, "-c", LIGHT_FIT, ",".join(TRAINING_STACK), cwd=tmp_path).stdout
  assert "failed 0 loaded []" in out, out
  gamma, lo, hi = map(float, out.replace("[", "").replace("]", "").replace(",", "").split()[1:4])
  assert lo < laws_paper_gamma() < hi and abs(gamma - laws_paper_gamma()) < 0.01, out


def laws_paper_gamma() -> float:
  from famjax.scaling import laws
  return laws.PAPER_FAMILIAL["gamma"]
