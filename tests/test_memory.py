"""The memory plan: XLA's bytes per device of the real train step on a simulated node, the
cheapest setting that fits, refusals, and the --dry_run --memory command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from famjax.study import memory

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
  cache = tmp_path_factory.mktemp("memory-cache")
  out = subprocess.run([sys.executable, str(ROOT / "tests" / "memory_checks.py"), str(cache)],
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
  assert setting is None and most_frugal == "fsdp 2, remat block, micro 1"
  assert line.startswith("refused r: d64L4 exits 2,4 fits no setting within 0.0 GB per device")
  assert "study.device_memory_gb" in line and "temporaries" in line


@pytest.mark.slow
def test_a_siblings_setting_is_tried_first_and_kept_when_it_fits(checks):
  assert checks["floor"] == "fsdp 2, remat dots, micro 2"


def test_ranks_order_remat_then_microbatches_then_fsdp():
  settings = [memory.Setting(8, "none", 1), memory.Setting(1, "none", 2),
              memory.Setting(1, "dots", 1), memory.Setting(1, "block", 1)]
  assert sorted(settings, key=memory._rank) == settings


@pytest.mark.slow
def test_dry_run_memory_prints_a_setting_for_every_run_and_refuses_what_cannot_fit(tmp_path):
  common = [sys.executable, "-m", "experiments.isoflop",
            "--config=experiments/configs/isoflop.py:tiny", "--dry_run", "--memory",
            "--config.study.budgets=(3e10,)", "--config.study.granularities=(1,2)",
            "--config.study.sizes_per_budget=1", "--config.study.planned_corpus_tokens=30000000",
            "--config.study.memory_devices=2", "--config.study.leverage="]
  env = dict(os.environ, FAMJAX_CACHE=str(tmp_path))
  ok = subprocess.run(common, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert ok.returncode == 0, ok.stderr[-3000:]
  rows = [l for l in ok.stdout.splitlines() if l.startswith("C3e10_")]
  assert len(rows) == 2 and all(l.endswith("fsdp 1, remat none, micro 1") for l in rows)
  assert "2 shapes, " in ok.stdout and "2 simulated devices" in ok.stdout
  refused = subprocess.run(common + ["--config.study.device_memory_gb=1e-6"], capture_output=True,
                           text=True, cwd=ROOT, env=env, timeout=600)
  assert refused.returncode == 0, refused.stderr[-3000:]
  lines = [l for l in refused.stdout.splitlines() if l.startswith("refused C3e10_")]
  assert len(lines) == 2 and "fits no setting within 0.0 GB per device" in lines[0]
