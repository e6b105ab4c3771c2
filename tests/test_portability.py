"""The fitter's tests again under a second XLA CPU code path, so that an outcome that holds only on
the CPU a test was written on fails on any machine (docs/testing.md).

`--xla_cpu_max_isa=AVX` makes XLA emit 256-bit code without fused multiply-adds: other rounding
than both an AVX2 machine (FMA) and an AVX-512 one (FMA, 512-bit reductions), so L-BFGS paths,
and which local minimum a start falls into, differ from the default code path on either.
"""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECOND_PATH = "--xla_cpu_max_isa=AVX"
# the fitter's test files; of these only the tests marked fp_path run again: those whose outcome
# follows an optimizer's floating-point path (fits, refits, bootstrap rates, the line search's
# own path), not those of closed forms, input errors, the command line or finite differences
PORTABLE = ("tests/scaling/test_fitting.py", "tests/scaling/test_bootstrap.py",
            "tests/scaling/test_line_search.py")


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="--xla_cpu_max_isa=AVX names an x86-64 instruction set")
def test_fitter_tests_pass_under_a_second_xla_code_path():
  flags = f"{os.environ.get('XLA_FLAGS', '')} {SECOND_PATH}".strip()
  # not an xdist worker: its own pytest run keeps its compilation cache in its own basetemp
  env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
  env["XLA_FLAGS"] = flags
  out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "fp_path", "-p",
                        "no:cacheprovider", *PORTABLE],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
  assert " passed" in out.stdout and " deselected" in out.stdout, out.stdout[-2000:]
