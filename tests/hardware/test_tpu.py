"""The memory plan for a TPU slice compiled by the TPU compiler itself (libtpu, the `tpu` extra):
the HBM it allows, the search's choice on its footprints, a step it refuses reported as not
fitting, and the cost table. `make check` runs this file with libtpu at the tpu extra's pin on its
path (Linux x86-64 only: libtpu ships no other wheel); elsewhere it says why it cannot run."""

import dataclasses
import itertools
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from famjax.hardware import cost, memory, tpu
from famjax.model.config import ModelConfig

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64"
    or tpu.libtpu_version() == "absent",
    reason="needs libtpu (the tpu extra, built for Linux x86-64 only): `make check` installs it "
           "in build/libtpu and runs this file with it")
ROOT = Path(__file__).resolve().parents[2]
SMALL = ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=2, d_ff=256, max_seq_len=256,
                    exit_layers=(2, 4), dtype="bfloat16")
SHAPE = (32, 256)


@pytest.fixture(scope="module")
def v5e():
  slice_devices = tpu.devices(tpu.parse("tpu:v5e:2x2"))
  return memory.Target(slice_devices, 1, tpu.available_hbm(slice_devices[0]), None,
                       "tpu:v5e:2x2")


def test_the_hbm_a_device_may_use_is_the_compilers_figure(v5e):
  assert len(v5e.devices) == 4 and v5e.devices[0].device_kind == "TPU v5 lite"
  assert v5e.capacity_bytes == pytest.approx(15.75 * 2**30, rel=1e-3)  # 16 GiB, less libtpu's


def cheapest_by_brute_force(target, fsdps=(1, 2, 4), micros=(1, 2, 4, 8)):
  """Every setting in rank order, compiled (or read from the target's cache) until one fits."""
  settings = sorted((memory.Setting(f, r, m) for f, r, m in
                     itertools.product(fsdps, memory.REMAT_ORDER, micros)), key=memory._rank)
  for setting in settings:
    if memory.measure(SMALL, SHAPE, setting, target).peak <= target.capacity_bytes:
      return setting
  return None


def test_the_search_picks_the_cheapest_setting_the_tpu_compiler_fits(v5e, tmp_path):
  """At a capacity just below the cheapest setting's peak (a slice with less HBM), the search's
  choice is the first setting in rank order that the TPU compiler fits; all of them are below
  the lower bound's floor."""
  cached = dataclasses.replace(v5e, cache_dir=tmp_path)
  first = memory.measure(SMALL, SHAPE, memory.Setting(1, "none", 1), cached)
  tight = dataclasses.replace(cached, capacity_bytes=first.peak - 1)
  plan = memory.choose(SMALL, SHAPE, tight)
  assert plan.setting is not None and plan.setting == cheapest_by_brute_force(tight)
  assert plan.footprint.peak <= tight.capacity_bytes
  assert memory.lower_bound(SMALL, SHAPE, plan.setting, tight) <= plan.footprint.peak


def test_the_cost_counts_remats_recomputation(v5e, tmp_path):
  cached = dataclasses.replace(v5e, cache_dir=tmp_path)
  plain = memory.measure(SMALL, SHAPE, memory.Setting(1, "none", 1), cached)
  block = memory.measure(SMALL, SHAPE, memory.Setting(1, "block", 1), cached)
  assert 1.15 < block.program_flops / plain.program_flops < 1.4  # a second forward of the blocks
  assert 0 < plain.flops < plain.program_flops / len(v5e.devices)  # XLA: loop bodies once
  plan = memory.choose(SMALL, SHAPE, cached)
  step = cost.step_cost(plan, SHAPE, cached)
  assert step.peak_flops == 197e12 and step.program_flops >= step.model_flops
  assert 0 < step.mfu_bound <= 1 and step.bound in ("compute", "memory")
  assert "v5e chip-hours" in cost.cost_table([plan], [], SHAPE, cached)


def test_a_step_the_compiler_refuses_does_not_fit(v5e):
  """Embeddings of 4M tokens: 26 GB of state a device, over the 16.9 GB the compiler allows."""
  huge = dataclasses.replace(SMALL, vocab_size=4 * 2**20, d_model=1024, n_heads=8, d_ff=2048)
  plan = memory.choose(huge, SHAPE, v5e, ("r",))
  assert plan.setting is None and plan.footprint.refused and plan.skipped > 0
  [line] = memory.refusals([plan], v5e)
  assert "the TPU compiler refused" in line and "study.memory_target" in line


@pytest.mark.slow
def test_the_dry_run_plans_a_tpu_slice_and_a_rerun_reads_the_cache(tmp_path):
  command = [sys.executable, "-m", "experiments.isoflop",
             "--config=tiny", "--dry_run", "--memory",
             "--config.study.memory_target=tpu:v5e:2x2", "--config.study.memory_runs=largest",
             "--config.study.planned_corpus_tokens=30000000", "--config.study.leverage="]
  env = dict(os.environ, FAMJAX_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
  first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "compiled by the TPU compiler" in first.stdout and "tpu:v5e:2x2" in first.stdout
  assert "step cost per device on tpu:v5e:2x2" in first.stdout
  again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert again.returncode == 0 and "0 programs compiled" in again.stdout
