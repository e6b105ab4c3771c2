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
# every fast fitter test whose outcome follows an optimizer's path (fits, refits, bootstrap
# outcomes) and the line search's own path; those that check closed forms, input errors, the
# command line or gradients by finite differences are left out (a third of the time)
PORTABLE = ("tests/test_scaling.py", "tests/test_bootstrap.py", "tests/test_linesearch.py")
PATH_FREE = ("closed_form", "grids", "published_law", "differentiable", "by_hand",
             "group_resampling", "bad_fit_data", "command_line", "gradients_match", "vmaps",
             "float32")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="--xla_cpu_max_isa=AVX names an x86-64 instruction set")
def test_fitter_tests_pass_under_a_second_xla_code_path():
  flags = f"{os.environ.get('XLA_FLAGS', '')} {SECOND_PATH}".strip()
  env = dict(os.environ, XLA_FLAGS=flags)
  out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p",
                        "no:cacheprovider", "-k", f"not ({' or '.join(PATH_FREE)})", *PORTABLE],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=840)
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
