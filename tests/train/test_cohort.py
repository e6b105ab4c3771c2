"""Cohorts: runs of one shape trained as one vectorised program equal the same runs trained alone
(to float tolerance), resume bitwise, and keep each run's workdir its own."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from famjax import data
from famjax.common.files import WorkdirBusy, WorkdirLock
from famjax.data.config import DataConfig
from famjax.train import cohort, loop, workdir_files
from famjax.train.config import ExperimentConfig, TrainConfig

from conftest import tiny_model

# measured: at most 2.4e-7 apart after 60 steps (vmap orders the batched matmuls otherwise)
TOLERANCE = 1e-5


def _vary(cfg, **train):
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


@pytest.fixture(scope="module")
def members(corpus_dir):
  """Three runs of one shape: other seeds, learning rates, exit weights and steps."""
  base = ExperimentConfig(
      model=tiny_model(d_model=16, n_layers=2, exit_layers=(1, 2)),
      data=DataConfig(corpus=str(corpus_dir), val_fraction=0.1),
      train=TrainConfig(batch_size=4, seq_len=16, steps=24, warmup_steps=3, log_every=4,
                        eval_every=12, eval_batches=2, checkpoint_every=8, progress=False))
  cfgs = [base, _vary(base, seed=1, learning_rate=6e-3, exit_weights=(0.3, 0.7)),
          _vary(base, seed=2, steps=16, exit_warmup_steps=4, schedule="wsd")]
  return cfgs, data.load_tokens(base.data)


def test_a_cohort_equals_its_runs_trained_alone(members, tmp_path):
  cfgs, tokens = members
  alone = [loop.train(cfg, tmp_path / f"alone{i}", tokens=tokens) for i, cfg in enumerate(cfgs)]
  together = cohort.train_cohort(cfgs, [tmp_path / f"co{i}" for i in range(3)], tokens)
  for i, (a, c) in enumerate(zip(alone, together)):
    assert c["step"] == a["step"] == cfgs[i].train.total_steps
    np.testing.assert_allclose(c["val_loss"], a["val_loss"], atol=TOLERANCE)
    np.testing.assert_allclose(c["train_loss"], a["train_loss"], atol=TOLERANCE)
    # each run's own files, as loop.train writes them
    logged = workdir_files.read_metrics(tmp_path / f"co{i}" / "metrics.jsonl")
    reference = workdir_files.read_metrics(tmp_path / f"alone{i}" / "metrics.jsonl")
    assert [m["step"] for m in logged] == [m["step"] for m in reference]
    assert json.loads((tmp_path / f"co{i}" / "summary.json").read_text())["step"] == a["step"]
  # the cohort's trained parameters load as any run's do
  _, model = loop.load_model(tmp_path / "co2")
  _, alone_model = loop.load_model(tmp_path / "alone2")
  for got, want in zip(jax.tree.leaves(model), jax.tree.leaves(alone_model)):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_paused_cohort_resumes_bitwise(members, tmp_path):
  cfgs, tokens = members
  dirs = [tmp_path / f"whole{i}" for i in range(3)]
  whole = cohort.train_cohort(cfgs, dirs, tokens)
  paused = [tmp_path / f"paused{i}" for i in range(3)]
  first = cohort.train_cohort(cfgs, paused, tokens, stop_after=8)
  assert [s["step"] for s in first] == [8, 8, 8]
  # one run goes on alone, the others as a cohort: all continue from their checkpoints
  resumed = [loop.train(cfgs[0], paused[0], tokens=tokens)]
  resumed += cohort.train_cohort(cfgs[1:], paused[1:], tokens)
  for w, r in zip(whole[1:], resumed[1:]):
    assert w["val_loss"] == r["val_loss"] and w["train_loss"] == r["train_loss"]
  np.testing.assert_allclose(resumed[0]["val_loss"], whole[0]["val_loss"], atol=TOLERANCE)
  # runs finished already resume to their summary without a step
  again = cohort.train_cohort(cfgs, dirs, tokens)
  assert [a["val_loss"] for a in again] == [w["val_loss"] for w in whole]


def test_a_busy_or_foreign_workdir_stops_only_its_run(members, tmp_path):
  cfgs, tokens = members
  dirs = [tmp_path / f"r{i}" for i in range(3)]
  loop.train(_vary(cfgs[2], seed=9), dirs[2], tokens=tokens, stop_after=1)  # another run's
  with WorkdirLock(dirs[0]):
    results = cohort.train_cohort(cfgs, dirs, tokens)
  assert isinstance(results[0], WorkdirBusy)
  assert isinstance(results[2], ValueError) and "holds a run with a different" in str(results[2])
  assert results[1]["step"] == cfgs[1].train.total_steps


def test_which_runs_share_a_cohort(members):
  cfgs, _ = members
  assert len({cohort.cohort_key(cfg) for cfg in cfgs}) == 1
  wider = dataclasses.replace(cfgs[0], model=dataclasses.replace(cfgs[0].model, d_model=32))
  assert cohort.cohort_key(wider) != cohort.cohort_key(cfgs[0])
  assert cohort.cohort_key(_vary(cfgs[0], batch_size=8)) != cohort.cohort_key(cfgs[0])
  assert cohort.cohort_key(_vary(cfgs[0], init_from="/some/dir")) is None
  with pytest.raises(ValueError, match="share every config field"):
    cohort.train_cohort([cfgs[0], wider], ["a", "b"], None)
