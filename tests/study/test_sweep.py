"""The sweep: skip, resume and failure handling with a stand-in trainer (fast), runs side by side
in workers and as cohorts against one at a time, and a real sweep killed with SIGKILL mid-run
and rerun (a subprocess, as a user's launcher would run it), leaving no worker behind."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from famjax.data.config import DataConfig
from famjax.model.config import ModelConfig
from famjax.study import isoflop, records, sweep, units, workers
from famjax.study.config import ExecutionConfig, StudyConfig
from famjax.train import loop
from famjax.train.config import ExperimentConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def mini_plan(corpus_dir):
  study = StudyConfig(budgets=(2e7, 4e7), granularities=(1, 2), widths=(8, 16), head_dim=4,
                      min_layers=2, layer_multiple=2, sizes_per_budget=2, min_steps=5,
                      tokens_per_param=20.0)
  base = ExperimentConfig(model=ModelConfig(vocab_size=264, max_seq_len=16),
                          data=DataConfig(corpus=str(corpus_dir), val_fraction=0.1),
                          train=TrainConfig(batch_size=4, seq_len=16, steps=1, warmup_steps=0,
                                            eval_batches=2, progress=False))
  return isoflop.plan_study(study, base)


class FakeTokens:
  fingerprint = "f" * 64


def fake_train(fail_on=()):
  """Stands in for loop.train: a summary whose losses fall with the run's tokens."""
  calls = []

  def run(cfg, workdir, tokens=None, **_):
    calls.append(Path(workdir).name)
    if Path(workdir).name in fail_on:
      raise RuntimeError("simulated out-of-memory")
    n = cfg.model.n_exits
    loss = [3.0 - 0.1 * g for g in range(n)]
    return {"train_loss": loss, "val_loss": loss, "tokens": cfg.train.total_steps * 64,
            "train_seconds": 0.5}

  return run, calls


def test_a_failing_run_is_recorded_and_the_rest_continue(corpus_dir, tmp_path, monkeypatch):
  plan = mini_plan(corpus_dir)
  bad = plan.runs[1].run_id
  run, calls = fake_train(fail_on={bad})
  monkeypatch.setattr(loop, "train", run)
  outcome = sweep.run(plan, tmp_path, tokens=FakeTokens(), progress=False)
  assert list(outcome.failed) == [bad] and "simulated out-of-memory" in outcome.failed[bad]
  assert len(outcome.trained) == len(plan.runs) - 1
  frame = records.collect(tmp_path)
  failed = frame[frame["run_id"] == bad]
  assert set(failed["status"]) == {"failed"} and failed["val_loss"].isna().all()
  assert "RuntimeError" in (tmp_path / "runs" / bad / "error.txt").read_text()
  # the next sweep retries the failed run only
  run, calls = fake_train()
  monkeypatch.setattr(loop, "train", run)
  again = sweep.run(plan, tmp_path, tokens=FakeTokens(), progress=False)
  assert calls == [bad] and again.trained == [bad]
  assert len(again.skipped) == len(plan.runs) - 1
  assert set(records.collect(tmp_path)["status"]) == {"ok"}


def test_two_tasks_train_every_run_exactly_once(corpus_dir, tmp_path, monkeypatch):
  plan = mini_plan(corpus_dir)
  run, calls = fake_train()
  monkeypatch.setattr(loop, "train", run)
  for task in range(2):
    sweep.run(plan, tmp_path, task_index=task, num_tasks=2, tokens=FakeTokens(), progress=False)
  assert sorted(calls) == sorted(r.run_id for r in plan.runs)
  frame = records.collect(tmp_path)
  assert frame.groupby(["run_id", "exit"]).size().max() == 1


def test_a_run_held_by_another_process_is_left_to_it(corpus_dir, tmp_path, monkeypatch):
  from famjax.common.files import WorkdirLock
  plan = mini_plan(corpus_dir)
  run, calls = fake_train()
  monkeypatch.setattr(loop, "train", run)
  held = plan.runs[0].run_id
  with WorkdirLock(sweep.run_dir(tmp_path, held)):
    monkeypatch.setattr(loop, "train", _locking(run))
    outcome = sweep.run(plan, tmp_path, tokens=FakeTokens(), progress=False)
  assert list(outcome.busy) == [held] and f"process {os.getpid()}" in outcome.busy[held]
  assert not (sweep.run_dir(tmp_path, held) / records.RECORDS).exists()


def _locking(run):
  """The stand-in trainer takes the workdir lock, as loop.train does."""
  from famjax.common.files import WorkdirLock

  def locked(cfg, workdir, **kwargs):
    with WorkdirLock(workdir):
      return run(cfg, workdir, **kwargs)
  return locked


def test_a_study_directory_of_another_plan_is_refused(corpus_dir, tmp_path):
  plan = mini_plan(corpus_dir)
  sweep.write_plan(tmp_path, plan)
  other = isoflop.StudyPlan(plan.runs[:2], (), ())
  with pytest.raises(ValueError, match="holds a study with another plan"):
    sweep.write_plan(tmp_path, other)
  sweep.write_plan(tmp_path, plan)  # the same plan again is fine


@pytest.mark.slow
def test_workers_and_cohorts_give_the_records_of_one_run_at_a_time(corpus_dir, tmp_path):
  plan = mini_plan(corpus_dir)
  alone = sweep.run(plan, tmp_path / "alone", progress=False)
  both = sweep.run(plan, tmp_path / "both", progress=False,
                   execution=ExecutionConfig(workers=2, cohort_size=4))
  assert sorted(both.trained) == sorted(alone.trained) == sorted(r.run_id for r in plan.runs)
  columns = ["run_id", "exit", "D", "N_family", "config_hash", "status"]
  one, two = (records.collect(tmp_path / d).sort_values(["run_id", "exit"]).reset_index()
              for d in ("alone", "both"))
  assert one[columns].equals(two[columns])
  # one core per worker instead of two, and vmap: float tolerance, not bitwise
  np.testing.assert_allclose(two["val_loss"], one["val_loss"], atol=1e-5)
  assert max(len(u) for u in units.form_units(list(plan.runs), 4)) > 1  # cohorts were formed


def test_units_are_cohorts_of_one_shape_largest_first(corpus_dir):
  plan = mini_plan(corpus_dir)
  alone = units.form_units(list(plan.runs), 1)
  assert [len(u) for u in alone] == [1] * len(plan.runs)
  assert [u[0].run_id for u in alone] == [r.run_id for r in plan.share(0, 1)]
  grouped = units.form_units(list(plan.runs), 2)
  assert sorted(s.run_id for u in grouped for s in u) == sorted(r.run_id for r in plan.runs)
  for unit in grouped:
    assert len(unit) <= 2 and len({s.experiment.model for s in unit}) == 1
  flops = [sum(s.flops for s in u) for u in grouped]
  assert flops == sorted(flops, reverse=True)


def test_workers_split_the_usable_cores():
  cores = workers.usable_cores()
  blocks = workers.core_sets(len(cores))
  assert sorted(c for b in blocks for c in b) == cores and all(len(b) == 1 for b in blocks)
  assert workers.core_sets(1) == [cores]
  assert len(workers.core_sets(len(cores) + 1)) == len(cores) + 1  # shared round-robin


MINI_PRESET = """
import ml_collections
from famjax.presets.isoflop import get_config as base

def get_config():
  config = base("tiny")
  config.study.budgets = (2e7, 4e7)
  config.study.granularities = (1, 2)
  config.study.widths = (8, 16)
  config.study.min_layers = 2
  config.study.layer_multiple = 2
  config.study.sizes_per_budget = 2
  config.study.min_steps = 5
  config.study.tokens_per_param = 20.0
  config.study.leverage = ""
  config.study.bootstrap = 100
  config.study.grid_every = 100
  config.model.max_seq_len = 16
  config.data.corpus = {corpus!r}
  config.data.val_fraction = 0.1
  config.train.batch_size = 4
  config.train.seq_len = 16
  config.train.eval_batches = 2
  config.train.checkpoint_every = 5
  config.study.workers = 2
  return config
"""


@pytest.mark.slow
def test_a_sweep_killed_mid_run_loses_nothing_and_duplicates_nothing(corpus_dir, tmp_path):
  preset = tmp_path / "mini.py"
  preset.write_text(MINI_PRESET.format(corpus=str(corpus_dir)))
  study_dir = tmp_path / "study"
  cmd = [sys.executable, "-m", "experiments.isoflop", f"--config={preset}",
         f"--outdir={study_dir}", "--live_fit=false", "--compilation_cache=none"]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  written = lambda: sorted(study_dir.glob(f"runs/*/{records.RECORDS}"))
  deadline = time.time() + 300
  while len(written()) < 2 and time.time() < deadline and proc.poll() is None:
    time.sleep(0.2)
  # wait until a run without records has a checkpoint: the kill lands mid-run
  started = lambda: [d for d in study_dir.glob("runs/*") if (d / "checkpoints").exists()
                     and not (d / records.RECORDS).exists()]
  while not started() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  children = _children(proc.pid)
  assert children, "the sweep started no worker process"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  deadline = time.time() + 20
  while any(_alive(pid) for pid in children) and time.time() < deadline:
    time.sleep(0.1)
  assert not any(_alive(pid) for pid in children), "a worker outlived its killed sweep"
  before = {p.parent.name: p.read_text() for p in written()}
  assert len(before) >= 2
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  plan = json.loads((study_dir / sweep.PLAN).read_text())
  after = {p.parent.name: p.read_text() for p in written()}
  assert sorted(after) == sorted(r["run_id"] for r in plan["runs"])
  for run_id, text in before.items():
    assert after[run_id] == text, f"{run_id} was trained again"
  frame = records.collect(study_dir)
  assert (frame.groupby(["run_id", "exit"]).size() == 1).all()
  assert set(frame["status"]) == {"ok"}
  for run in study_dir.glob("runs/*"):
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in l]
    assert steps == sorted(set(steps)), run.name
  assert (study_dir / "report.md").exists() and "familial law" in done.stdout


def _children(pid: int) -> list[int]:
  """The processes whose parent is pid (Linux /proc)."""
  found = []
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      found.append(int(stat.parent.name))
  return found


def _alive(pid: int) -> bool:
  try:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except OSError:
    return False
  return state != "Z"
