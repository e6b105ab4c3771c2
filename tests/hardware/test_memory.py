"""The memory plan: XLA's bytes per device of the real train step on a simulated node, the
cheapest setting that fits, refusals, and the --dry_run --memory command line."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from famjax.hardware import cost, memory, tpu
from famjax.study.config import StudyConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
  cache = tmp_path_factory.mktemp("memory-cache")
  out = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "memory_checks.py"),
                        str(cache)],
                       capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_the_search_finds_the_cheapest_setting_that_fits_at_every_capacity(checks):
  measured = checks["measured"]
  for peak, (setting, _) in checks["chosen"].items():
    fitting = [(rank, name) for name, (rank, fp) in measured.items() if fp["peak"] <= int(peak)]
    assert setting == min(fitting)[1], peak


@pytest.mark.slow
def test_fewer_microbatches_fsdp_and_no_remat_cost_memory(checks):
  peak = {name: fp["peak"] for name, (_, fp) in checks["measured"].items()}
  assert peak["fsdp 1, remat none, micro 1"] > peak["fsdp 1, remat none, micro 4"]
  assert peak["fsdp 1, remat none, micro 1"] > peak["fsdp 2, remat none, micro 1"]
  assert peak["fsdp 1, remat none, micro 1"] > peak["fsdp 1, remat block, micro 1"]


@pytest.mark.slow
def test_parameters_and_optimizer_state_match_the_formula(checks):
  for fsdp, difference in checks["state_difference"].items():
    assert abs(difference) < 0.05, fsdp


@pytest.mark.slow
def test_a_shape_that_fits_nothing_is_refused_with_its_need(checks):
  setting, most_frugal, (line, *_) = checks["impossible"]
  assert setting is None and most_frugal == "fsdp 2, remat block, micro 4"
  assert line.startswith("refused r: d64L4 exits 2,4 fits no setting within 0.0 GB per device")
  assert "study.device_memory_gb" in line and "temporaries" in line


@pytest.mark.slow
def test_a_siblings_setting_is_tried_first_and_kept_when_it_fits(checks):
  assert checks["floor"] == "fsdp 2, remat dots, micro 2"


@pytest.mark.slow
def test_the_lower_bound_is_below_every_measured_peak(checks):
  for name, (_, fp) in checks["measured"].items():
    assert 0 < checks["bounds"][name] <= fp["peak"], name


def test_tpu_targets_are_parsed_and_bad_ones_named():
  slice_ = tpu.parse("tpu:v5p:2x2x2")
  assert slice_.topology == "v5p:2x2x2" and slice_.chips == 8 and slice_.chip.peak_flops == 459e12
  assert tpu.parse("tpu:v5e:4x4").chips == 16
  for bad in ("gpu", "tpu:v9:2x2", "tpu:v5p", "tpu:v5p:2x2x2x2", "v5p:2x2x2"):
    with pytest.raises(ValueError, match="study.memory_target must be 'cpu' or 'tpu:GEN"):
      tpu.parse(bad)
  with pytest.raises(ValueError, match="study.memory_runs"):
    StudyConfig(memory_runs="smallest")
  with pytest.raises(ValueError, match="study.memory_target"):
    StudyConfig(memory_target="tpu:v7x:2x2")


def test_the_compilers_refusal_is_read_in_binary_units():
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
             "temporaries (678.71G) exceeds available HBM (95.74G).")
  required, available = tpu.refusal(message)
  assert required == pytest.approx(678.71 * 2**30) and available == pytest.approx(95.74 * 2**30)
  assert tpu.refusal("INVALID_ARGUMENT: something else") is None


def test_matmul_flops_count_every_scan_iteration_and_remats_recomputation():
  n, layers = 16, 5
  step = lambda x, w: jnp.tanh(x @ w)
  forward = lambda x, ws: jax.lax.scan(lambda c, w: (step(c, w), None), x, ws)[0].sum()
  x, ws = jnp.ones((n, n)), jnp.ones((layers, n, n))
  one = 2.0 * n**3
  assert cost.matmul_flops(jax.make_jaxpr(forward)(x, ws)) == layers * one
  plain = cost.matmul_flops(jax.make_jaxpr(jax.grad(forward, argnums=1))(x, ws))
  remat = lambda x, ws: jax.lax.scan(lambda c, w: (jax.checkpoint(step)(c, w), None), x, ws)[0]
  recomputed = cost.matmul_flops(jax.make_jaxpr(jax.grad(lambda x, ws: remat(x, ws).sum(),
                                                         argnums=1))(x, ws))
  assert plain == 3 * layers * one and recomputed == 4 * layers * one


def test_the_roofline_takes_the_slower_of_compute_and_memory():
  step = cost.StepCost(model_flops=3e12, program_flops=4e12, compiler_flops=1e12,
                       compiler_bytes=1e9, min_bytes=3e9, peak_flops=1e14, bandwidth=1e11)
  assert step.compute_seconds == pytest.approx(0.04) and step.memory_seconds == pytest.approx(0.03)
  assert step.bound == "compute" and step.mfu_bound == pytest.approx(0.75)
  slow = dataclasses.replace(step, bandwidth=1e10)
  assert slow.bound == "memory" and slow.mfu_bound == pytest.approx(3e12 / (0.3 * 1e14))


def test_the_traffic_floor_counts_the_optimizer_once_and_weights_per_microbatch():
  model = SimpleNamespace(dtype="bfloat16")
  setting = memory.Setting(fsdp=4, remat="block", microbatches=8)
  floor = cost.min_traffic(model, setting, params=1000, model_axis=2, fsdp=4)
  assert floor == 32 * 1000 / 8 + 3 * 2 * 1000 / 2 * 8


def test_largest_per_budget_keeps_each_budgets_largest_family():
  run = lambda budget, params, g: SimpleNamespace(
      budget=budget, granularity=g, accounting=SimpleNamespace(params_total=params))
  runs = [run(1e19, 10, 1), run(1e19, 30, 1), run(1e19, 30, 4), run(1e20, 50, 2), run(1e20, 5, 4)]
  assert memory.largest_per_budget(runs) == [runs[2], runs[3]]


def test_ranks_order_remat_then_microbatches_then_fsdp():
  settings = [memory.Setting(8, "none", 1), memory.Setting(1, "none", 2),
              memory.Setting(1, "dots", 1), memory.Setting(1, "block", 1)]
  assert sorted(settings, key=memory._rank) == settings


@pytest.mark.slow
def test_dry_run_memory_prints_a_setting_for_every_run_and_refuses_what_cannot_fit(tmp_path):
  common = [sys.executable, "-m", "experiments.isoflop",
            "--config=tiny", "--dry_run", "--memory",
            "--config.study.budgets=(3e10,)", "--config.study.granularities=(1,2)",
            "--config.study.sizes_per_budget=1", "--config.study.planned_corpus_tokens=30000000",
            "--config.study.memory_devices=2", "--config.study.leverage="]
  env = dict(os.environ, FAMJAX_CACHE=str(tmp_path))
  ok = subprocess.run(common, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert ok.returncode == 0, ok.stderr[-3000:]
  rows = [l for l in ok.stdout.splitlines() if l.startswith("C3e10_")]
  assert len(rows) == 2 and all(l.endswith("fsdp 1, remat none, micro 1") for l in rows)
  assert "2 shapes, " in ok.stdout and "2 simulated CPU devices" in ok.stdout
  refused = subprocess.run(common + ["--config.study.device_memory_gb=1e-6"], capture_output=True,
                           text=True, cwd=ROOT, env=env, timeout=600)
  assert refused.returncode == 0, refused.stderr[-3000:]
  lines = [l for l in refused.stdout.splitlines() if l.startswith("refused C3e10_")]
  assert len(lines) == 2 and "fits no setting within 0.0 GB per device" in lines[0]


KILLED_PLAN = """
import concurrent.futures, multiprocessing, os, sys, time
from famjax.hardware import memory

if __name__ == "__main__":
  with concurrent.futures.ProcessPoolExecutor(
      1, mp_context=multiprocessing.get_context("spawn"), initializer=memory._start_worker,
      initargs=(1, "cpu")) as pool:
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 600)  # a backbone's compiles, minutes long
    time.sleep(600)
"""


def _running(pid: int) -> bool:
  try:
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_a_killed_plan_takes_its_compile_workers_with_it(tmp_path):
  script = tmp_path / "plan.py"
  script.write_text(KILLED_PLAN)
  plan = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                          cwd=ROOT)
  worker = int(plan.stdout.readline())
  assert _running(worker)
  plan.kill()
  plan.wait()
  deadline = time.monotonic() + 30
  while _running(worker) and time.monotonic() < deadline:
    time.sleep(0.2)
  try:
    assert not _running(worker), "the plan's worker outlived it"
  finally:
    if _running(worker):
      os.kill(worker, signal.SIGKILL)
