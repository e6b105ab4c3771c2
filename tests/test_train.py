import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from famjax import checkpoint, data, sharding, train

from conftest import tiny_model
from famjax.config import DataConfig, ExperimentConfig, TrainConfig


def restored_params(workdir, cfg):
  trainer = train.Trainer.create(cfg, sharding.make_mesh())
  mngr = checkpoint.manager(workdir, 3)
  state, _ = checkpoint.restore(mngr, mngr.latest_step(), trainer.state)
  return state["params"]


def metrics(workdir):
  return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_dir):
  """A 60-step run straight through, and the same run paused at 30 and resumed."""
  cfg = ExperimentConfig(
      model=tiny_model(),
      data=DataConfig(corpus=str(corpus_dir), val_fraction=0.1),
      train=TrainConfig(batch_size=8, seq_len=32, steps=60, learning_rate=1e-2, warmup_steps=5,
                        log_every=10, eval_every=30, eval_batches=2, checkpoint_every=20,
                        progress=False))
  root = tmp_path_factory.mktemp("runs")
  tokens = data.load_tokens(cfg.data)
  val = data.eval_batches(tokens.val, 32, 8, 2)
  initial_val = train.Trainer.create(cfg, sharding.make_mesh()).evaluate(val)
  full = train.train(cfg, root / "straight")
  paused = train.train(cfg, root / "resumed", stop_after=30)
  resumed = train.train(cfg, root / "resumed")
  return dict(cfg=cfg, root=root, initial_val=initial_val, full=full, paused=paused,
              resumed=resumed)


def test_training_lowers_every_exits_validation_loss(runs):
  assert np.all(np.asarray(runs["full"]["val_loss"]) < runs["initial_val"] - 0.5)


def test_summary_has_the_documented_fields(runs):
  summary = json.loads((runs["root"] / "straight" / "summary.json").read_text())
  assert summary["exit_layers"] == [1, 2, 3] and summary["step"] == 60
  assert summary["tokens"] == 60 * 8 * 32
  assert len(summary["train_loss"]) == len(summary["val_loss"]) == 3
  assert summary["params_per_exit"][0] < summary["params_per_exit"][-1]
  assert summary["flops_per_token"] > 0 and len(summary["corpus_fingerprint"]) == 64


def test_pause_and_resume_equals_an_uninterrupted_run(runs):
  assert runs["paused"]["step"] == 30 and runs["resumed"]["step"] == 60
  np.testing.assert_array_equal(runs["resumed"]["val_loss"], runs["full"]["val_loss"])
  np.testing.assert_array_equal(runs["resumed"]["train_loss"], runs["full"]["train_loss"])
  straight = [m for m in metrics(runs["root"] / "straight") if "train_loss" in m]
  resumed = [m for m in metrics(runs["root"] / "resumed") if "train_loss" in m]
  assert [m["step"] for m in resumed] == [m["step"] for m in straight]
  assert [m["train_loss"] for m in resumed] == [m["train_loss"] for m in straight]
  a = restored_params(runs["root"] / "straight", runs["cfg"])
  b = restored_params(runs["root"] / "resumed", runs["cfg"])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_rerunning_a_finished_run_trains_nothing(runs):
  again = train.train(runs["cfg"], runs["root"] / "straight")
  assert again["val_loss"] == runs["full"]["val_loss"] and again["step"] == 60


def test_workdir_of_another_config_is_refused(runs):
  import dataclasses
  other = dataclasses.replace(runs["cfg"], model=tiny_model(exit_layers=(2, 3)))
  with pytest.raises(ValueError, match="different.*model"):
    train.train(other, runs["root"] / "straight")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_experiment, tmp_path,
                                                                   monkeypatch):
  """A run that diverges at step 7 (NaN weights) stops there; checkpoint 6 stays good."""
  original, calls = train.Trainer.step, []

  def diverging_step(self, tokens_BT):
    calls.append(1)
    if len(calls) == 7:
      self.params = jax.tree.map(lambda x: x * np.nan, self.params)
    return original(self, tokens_BT)

  monkeypatch.setattr(train.Trainer, "step", diverging_step)
  cfg = tiny_experiment(checkpoint_every=2, steps=40)
  with pytest.raises(FloatingPointError, match="non-finite training loss at step 7"):
    train.train(cfg, tmp_path)
  assert checkpoint.manager(tmp_path, 3).latest_step() == 6
  params = restored_params(tmp_path, cfg)
  assert all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(params))
  monkeypatch.setattr(train.Trainer, "step", original)
  assert train.train(cfg, tmp_path, stop_after=8)["step"] == 8  # and it resumes from there


def test_vocabulary_smaller_than_the_tokenizer_is_an_error(tiny_experiment, tmp_path):
  cfg = tiny_experiment(model=tiny_model(vocab_size=100))
  with pytest.raises(ValueError, match="model.vocab_size=100"):
    train.train(cfg, tmp_path)


def test_command_line_entry_point(corpus_dir, tmp_path):
  root = Path(__file__).resolve().parents[1]
  cmd = [sys.executable, "-m", "experiments.train",
         "--config=experiments/configs/train.py:tiny", f"--workdir={tmp_path}",
         f"--config.data.corpus={corpus_dir}", "--config.data.val_fraction=0.1",
         "--config.model.d_model=32", "--config.model.n_heads=2", "--config.model.d_ff=64",
         "--config.train.steps=4", "--config.train.warmup_steps=1", "--config.train.seq_len=32",
         "--config.train.batch_size=4", "--config.train.progress=False"]
  out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=os.environ, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "val loss" in out.stdout and len(out.stdout.strip().splitlines()) >= 5
  assert json.loads((tmp_path / "summary.json").read_text())["step"] == 4
