import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from famjax import data
from famjax.data.config import DataConfig
from famjax.model import counts, sharding
from famjax.train import checkpoint, loop, optimizer, step
from famjax.train.config import ExperimentConfig, TrainConfig

from conftest import tiny_model


def restored_params(workdir, cfg):
  trainer = loop.Trainer.create(cfg, sharding.make_mesh())
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
  initial_val = loop.Trainer.create(cfg, sharding.make_mesh()).evaluate(val)
  full = loop.train(cfg, root / "straight")
  paused = loop.train(cfg, root / "resumed", stop_after=30)
  resumed = loop.train(cfg, root / "resumed")
  return dict(cfg=cfg, root=root, initial_val=initial_val, full=full, paused=paused,
              resumed=resumed)


def test_training_lowers_every_exits_validation_loss(runs):
  assert np.all(np.asarray(runs["full"]["val_loss"]) < runs["initial_val"] - 0.5)


def test_summary_has_the_documented_fields(runs):
  summary = json.loads((runs["root"] / "straight" / "summary.json").read_text())
  acc = counts.account(runs["cfg"].model, 32)
  assert summary["exit_layers"] == [1, 2, 3] and summary["step"] == 60
  assert summary["tokens"] == 60 * 8 * 32
  assert len(summary["train_loss"]) == len(summary["val_loss"]) == 3
  assert summary["params_per_exit"] == list(acc.params_per_exit)
  assert summary["non_embedding_params_per_exit"] == list(acc.non_embedding_per_exit)
  assert summary["params_total"] == acc.params_total
  assert summary["flops_per_token"] == acc.flops_per_token
  tokens = data.load_tokens(runs["cfg"].data)
  assert summary["corpus_fingerprint"] == tokens.fingerprint
  from importlib import metadata
  assert summary["versions"] == {**{name: metadata.version(name) for name in (
      "famjax", "jax", "jaxlib", "flax", "optax", "numpy")}, "backend": "cpu"}
  last = [m for m in metrics(runs["root"] / "straight") if "train_loss" in m][-1]
  assert last["step"] == 60 and summary["train_loss"] == pytest.approx(last["train_loss"])


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


def test_a_model_loads_for_deployment_with_its_parameters_only(runs, monkeypatch):
  """load_model restores the newest checkpoint's parameters and reads no optimizer state: the
  optimizer is never initialised, and the parameters equal those of a full restore."""
  def no_optimizer(*_):
    raise AssertionError("load_model built an optimizer state")
  monkeypatch.setattr(loop.Trainer, "create", no_optimizer)
  cfg, model = loop.load_model(runs["root"] / "straight")
  assert cfg == runs["cfg"]
  from flax import nnx
  loaded = nnx.to_pure_dict(nnx.state(model))
  monkeypatch.undo()
  expected = restored_params(runs["root"] / "straight", runs["cfg"])
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# G = 4 in make test; the dense special case (G = 1) in make check
@pytest.mark.parametrize("exit_layers", [pytest.param((3,), marks=pytest.mark.slow),
                                         (1, 2, 3, 4)], ids=["G1", "G4"])
def test_accumulated_microbatches_update_as_the_whole_batch(tiny_experiment, exit_layers):
  """With the batch in 4 microbatches the gradients equal the whole batch's (float32 sums in
  another order: 1e-5 of the largest), and two training steps give the same losses and gradient
  norms (1e-5) and parameters (within 2e-4 of Adam updates of ~1e-2: Adam divides each gradient
  by the root of its second moment, so a near-zero gradient moves its parameter with its last
  bits)."""
  import dataclasses
  model = tiny_model(n_layers=max(exit_layers), exit_layers=exit_layers)
  cfg = tiny_experiment(model=model, learning_rate=1e-2, warmup_steps=0)
  tokens = data.load_tokens(cfg.data)
  batches = data.train_batches(tokens.train, 32, 8, 0)
  steps = [next(batches) for _ in range(2)]
  mesh = sharding.make_mesh()
  progs = step.programs(model, mesh)
  weights_G = jnp.full(len(exit_layers), 1.0 / len(exit_layers))
  value_and_grad = jax.value_and_grad(lambda p, b: jnp.dot(
      weights_G, step.exit_losses(progs.graphdef, p, b)))
  with jax.set_mesh(mesh):
    params = progs.init_params(0)
    whole = jax.jit(value_and_grad)(params, jnp.asarray(steps[0]))
    parts = jax.jit(lambda p, b: step._accumulated(value_and_grad, p, b, 4))(
        params, jnp.asarray(steps[0]))
  for a, b in zip(jax.tree.leaves(parts), jax.tree.leaves(whole), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  out = {}
  for m in (1, 4):
    trainer = loop.Trainer.create(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, microbatches=m)), mesh)
    out[m] = [jax.device_get(trainer.step(b)) for b in steps], jax.device_get(trainer.params)
  for whole_metrics, parts_metrics in zip(out[1][0], out[4][0]):
    for key in ("loss", "exit_loss", "grad_norm"):
      np.testing.assert_allclose(parts_metrics[key], whole_metrics[key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(out[4][1]), jax.tree.leaves(out[1][1]), strict=True):
    np.testing.assert_allclose(a, b, atol=2e-4)


def test_microbatches_must_divide_the_batch():
  with pytest.raises(ValueError, match=r"train\.microbatches.*divisor of train\.batch_size=8"):
    TrainConfig(batch_size=8, microbatches=3)


def test_rerunning_a_finished_run_trains_nothing(runs, monkeypatch):
  workdir = runs["root"] / "straight"
  log_before = (workdir / "metrics.jsonl").read_text()
  steps_before = checkpoint.manager(workdir, 3).all_steps()
  calls = []
  original = loop.Trainer.step
  monkeypatch.setattr(loop.Trainer, "step", lambda self, b: calls.append(1) or original(self, b))
  again = loop.train(runs["cfg"], workdir)
  assert calls == [] and again["step"] == 60
  assert again["val_loss"] == runs["full"]["val_loss"]
  assert again["train_loss"] == runs["full"]["train_loss"]
  assert (workdir / "metrics.jsonl").read_text() == log_before
  assert checkpoint.manager(workdir, 3).all_steps() == steps_before


def test_workdir_of_another_config_is_refused(runs):
  import dataclasses
  other = dataclasses.replace(runs["cfg"], model=tiny_model(exit_layers=(2, 3)))
  with pytest.raises(ValueError, match="different.*model"):
    loop.train(other, runs["root"] / "straight")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_experiment, tmp_path,
                                                                   monkeypatch):
  """A run that diverges at step 7 (NaN weights) stops there; checkpoint 6 stays good."""
  original, calls = loop.Trainer.step, []

  def diverging_step(self, tokens_BT):
    calls.append(1)
    if len(calls) == 7:
      self.params = jax.tree.map(lambda x: x * np.nan, self.params)
    return original(self, tokens_BT)

  monkeypatch.setattr(loop.Trainer, "step", diverging_step)
  cfg = tiny_experiment(checkpoint_every=2, steps=40)
  with pytest.raises(FloatingPointError, match="non-finite training loss at step 7"):
    loop.train(cfg, tmp_path)
  assert checkpoint.manager(tmp_path, 3).latest_step() == 6
  params = restored_params(tmp_path, cfg)
  assert all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(params))
  monkeypatch.setattr(loop.Trainer, "step", original)
  assert loop.train(cfg, tmp_path, stop_after=8)["step"] == 8  # and it resumes from there


def test_vocabulary_smaller_than_the_tokenizer_is_an_error(tiny_experiment, tmp_path):
  cfg = tiny_experiment(model=tiny_model(vocab_size=100))
  with pytest.raises(ValueError, match="model.vocab_size=100"):
    loop.train(cfg, tmp_path)


@pytest.mark.slow
def test_command_line_entry_point(corpus_dir, tmp_path):
  root = Path(__file__).resolve().parents[2]
  cmd = [sys.executable, "-m", "experiments.train",
         "--config=tiny", f"--workdir={tmp_path}",
         f"--config.data.corpus={corpus_dir}", "--config.data.val_fraction=0.1",
         "--config.model.d_model=32", "--config.model.n_heads=2", "--config.model.d_ff=64",
         "--config.train.steps=4", "--config.train.warmup_steps=1", "--config.train.seq_len=32",
         "--config.train.batch_size=4", "--config.train.progress=False"]
  out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=os.environ, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "val loss" in out.stdout and len(out.stdout.strip().splitlines()) >= 5
  assert json.loads((tmp_path / "summary.json").read_text())["step"] == 4


def test_the_loss_is_the_exit_weighted_sum_and_a_zero_weight_exit_is_not_trained(
    tiny_experiment, corpus_dir):
  cfg = tiny_experiment(exit_weights=(0.25, 0.0, 0.75), weight_decay=0.0, warmup_steps=0)
  trainer = loop.Trainer.create(cfg, sharding.make_mesh())
  before = jax.tree.map(np.asarray, trainer.params)
  batch = np.random.default_rng(0).integers(0, 259, (8, 33), dtype=np.int32)
  metrics = jax.device_get(trainer.step(batch))
  assert float(metrics["loss"]) == pytest.approx(
      0.25 * metrics["exit_loss"][0] + 0.75 * metrics["exit_loss"][2], rel=1e-6)
  after = jax.tree.map(np.asarray, trainer.params)
  changed = lambda path: any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(path(before)), jax.tree.leaves(path(after))))
  assert not changed(lambda p: p["exits"][1])  # norm and unembedding of the zero-weight exit
  assert changed(lambda p: p["exits"][0]) and changed(lambda p: p["exits"][2])
  assert changed(lambda p: p["segments"][0])
  default = loop.Trainer.create(tiny_experiment(), sharding.make_mesh())  # 1/G each
  metrics = jax.device_get(default.step(batch))
  assert float(metrics["loss"]) == pytest.approx(float(np.mean(metrics["exit_loss"])), rel=1e-6)


@pytest.mark.parametrize("schedule, checks", [
    ("cosine", {0: 0.0, 10: 1e-2, 55: 5.5e-3, 100: 1e-3}),
    ("wsd", {0: 0.0, 10: 1e-2, 50: 1e-2, 80: 1e-2, 90: 5.5e-3, 100: 1e-3}),
])
def test_learning_rate_schedules(schedule, checks):
  """Warmup to the peak at step 10, then cosine to 10% at the end, or stable until 80% of the
  steps and linear to 10% (WSD, decay_fraction 0.2)."""
  tc = TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-2, min_lr_ratio=0.1,
                   schedule=schedule, decay_fraction=0.2)
  lr = optimizer.learning_rate_schedule(tc)
  for at, value in checks.items():
    assert float(lr(at)) == pytest.approx(value, rel=1e-5, abs=1e-9), at


def test_weight_decay_spares_norm_scales():
  params = {"kernel": np.ones((3, 4), np.float32), "norm": {"scale": np.ones(4, np.float32)}}
  adamw = optimizer.make_optimizer()
  state = optimizer.with_hyperparameters(adamw.init(params), optimizer.hyperparameters(
      TrainConfig(weight_decay=0.5), 1.0))
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = adamw.update(zeros, state, params)
  np.testing.assert_allclose(updates["kernel"], -0.5 * params["kernel"])
  np.testing.assert_array_equal(updates["norm"]["scale"], 0.0)
