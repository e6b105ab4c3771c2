"""Training: Optax AdamW on the weighted sum of per-exit losses, the compiled programs, the loop
with Orbax resume, and loading a trained model. What the loop writes into the workdir (identity,
config history, metrics, summary) is workdir.py's.

The compiled programs (parameter init, optimizer init, train step, evaluation) depend on the model
config and the mesh only: the learning rate of each step, the other optimizer hyperparameters and
the exit weights are inputs, so runs that differ in steps, budgets or schedules (an IsoFLOP sweep)
share one compilation per model shape.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from famjax import accounting, checkpoint, data, hf, sharding, tracking, trainable
from famjax import workdir as workdir_files
from famjax.config import ExperimentConfig, MeshConfig, ModelConfig, TrainConfig
from famjax.files import WorkdirLock
from famjax.model import FamilialTransformer
from famjax.trainable import merge as merge_trainable


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
  total, peak = tc.total_steps, tc.learning_rate
  end = peak * tc.min_lr_ratio
  if tc.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, tc.warmup_steps, total, end)
  decay = max(1, int(round(total * tc.decay_fraction)))
  stable = max(0, total - tc.warmup_steps - decay)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, tc.warmup_steps), optax.constant_schedule(peak),
       optax.linear_schedule(peak, end, decay)],
      boundaries=[tc.warmup_steps, tc.warmup_steps + stable])


def decay_mask(params):
  """Weight decay on matrices only: norm scales (1-D parameters) are not decayed."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer() -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW, with every numeric hyperparameter held in the optimizer
  state (optax.inject_hyperparams) and set each step by `with_hyperparameters`."""
  return optax.chain(
      optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=1.0),
      optax.inject_hyperparams(optax.adamw, static_args="mask")(
          learning_rate=0.0, b1=0.9, b2=0.95, weight_decay=0.0, mask=decay_mask))


def hyperparameters(tc: TrainConfig, learning_rate) -> dict:
  return {"max_norm": tc.grad_clip, "learning_rate": learning_rate, "b1": tc.b1, "b2": tc.b2,
          "weight_decay": tc.weight_decay}


def with_hyperparameters(opt_state, hparams: dict):
  clip, adamw = opt_state
  set_ = lambda s, keys: s._replace(hyperparams={
      **s.hyperparams, **{k: jnp.asarray(hparams[k], s.hyperparams[k].dtype) for k in keys}})
  return (set_(clip, ("max_norm",)), set_(adamw, ("learning_rate", "b1", "b2", "weight_decay")))


def exit_weights(tc: TrainConfig, n_exits: int, step: int) -> np.ndarray:
  """The exits' loss weights at `step` (0-based): train.exit_weights, the early exits' scaled by
  step / train.exit_warmup_steps until the warm-up ends (as EE-Tuning and LayerSkip ramp them)."""
  weights_G = np.asarray(tc.weights_for(n_exits), np.float32)
  if step < tc.exit_warmup_steps:
    weights_G[:-1] *= step / tc.exit_warmup_steps
  return weights_G


def exit_losses(graphdef: nnx.GraphDef, params: dict, tokens_BT: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy of every exit, ce_G (float32)."""
  return nnx.merge(graphdef, params).exit_losses(tokens_BT[:, :-1], tokens_BT[:, 1:])


def _accumulated(value_and_grad, params, tokens_BT, microbatches: int):
  """value_and_grad's outputs averaged over equal microbatches run one after another (lax.scan):
  the whole batch's values, holding one microbatch's activations. Microbatch m takes rows m,
  m + M, m + 2M, ..., so that the rows each device holds split evenly among microbatches."""
  b, t = tokens_BT.shape
  tokens_MBT = tokens_BT.reshape(b // microbatches, microbatches, t).swapaxes(0, 1)
  shapes = jax.eval_shape(value_and_grad, params, tokens_MBT[0])
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def add(total, micro_BT):
    return jax.tree.map(jnp.add, total, value_and_grad(params, micro_BT)), None

  total, _ = jax.lax.scan(add, zeros, tokens_MBT)
  return jax.tree.map(lambda x: x / microbatches, total)


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """What a train step is besides its inputs: the model's graph, the optimizer, gradient
  accumulation over `microbatches`, and `split` (params -> (trainable, frozen), see
  famjax.trainable; None: everything trains)."""

  graphdef: nnx.GraphDef
  optimizer: optax.GradientTransformation
  microbatches: int = 1
  split: Any = None


def train_step(params, opt_state, tokens_BT, hparams, weights_G, *, plan: StepPlan):
  """One optimizer step. Gradients and updates cover the trainable part of params; frozen
  parameters pass through unchanged."""
  split, graphdef = plan.split, plan.graphdef
  part, frozen = split(params) if split else (params, {})

  def loss_fn(p, batch_BT):
    ce_G = exit_losses(graphdef, merge_trainable(p, frozen) if split else p, batch_BT)
    return jnp.dot(weights_G, ce_G), ce_G

  value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
  if plan.microbatches == 1:
    (loss, ce_G), grads = value_and_grad(part, tokens_BT)
  else:
    (loss, ce_G), grads = _accumulated(value_and_grad, part, tokens_BT, plan.microbatches)
  opt_state = with_hyperparameters(opt_state, hparams)
  updates, opt_state = plan.optimizer.update(grads, opt_state, part)
  part = optax.apply_updates(part, updates)
  params = merge_trainable(part, frozen) if split else part
  return params, opt_state, {"loss": loss, "exit_loss": ce_G, "grad_norm": optax.global_norm(grads)}


@dataclasses.dataclass(frozen=True)
class Programs:
  """The jitted functions of one model config on one mesh (built once per process, see
  `programs`)."""

  graphdef: nnx.GraphDef
  init_params: Any  # seed -> params, each parameter born with its rules-table sharding
  init_opt: Any  # params -> optimizer state
  step: Any  # (params, opt_state, tokens_BT, hparams, weights_G) -> (params, opt_state, metrics)
  evaluate: Any  # (params, tokens_BT) -> ce_G


@functools.lru_cache(maxsize=32)
def programs(cfg: ModelConfig, mesh: jax.sharding.Mesh, microbatches: int = 1,
             trainable_last_layers: int | None = None) -> Programs:
  """Parameters and optimizer state are plain nested dicts of arrays (nnx.to_pure_dict), which
  jit flattens several times faster than nnx.State: on tiny models that is a tenth of a step.
  `microbatches` > 1 accumulates each step's gradients over that many parts of its batch.
  `trainable_last_layers` (TrainConfig.trainable_last_layers) freezes all but the exit heads and
  the last layers: the optimizer state covers only what trains."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
    abstract = nnx.eval_shape(lambda: FamilialTransformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  param_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_state, mesh))
  abstract_params = nnx.to_pure_dict(abstract_state)
  optimizer = make_optimizer()
  split = None if trainable_last_layers is None else functools.partial(
      trainable.split, cfg=cfg, last_layers=trainable_last_layers)
  trained = (lambda params: split(params)[0]) if split else (lambda params: params)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, trained(abstract_params)),
      trained(param_shardings),
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))
  batch = sharding.batch_sharding(mesh)

  def init_params(seed):
    with nnx.logical_axis_rules(sharding.RULES):
      model = FamilialTransformer(cfg, rngs=nnx.Rngs(jax.random.key(seed)))
    return nnx.to_pure_dict(nnx.state(model))

  return Programs(
      graphdef=graphdef,
      # Compiling at optimisation level 0 saves a third of the init's compile time (~0.6 s a
      # model shape on CPU); it runs once per run, in milliseconds either way.
      init_params=jax.jit(init_params, out_shardings=param_shardings,
                          compiler_options={"xla_backend_optimization_level": 0}),
      init_opt=jax.jit(lambda params: optimizer.init(trained(params)),
                       in_shardings=(param_shardings,), out_shardings=opt_shardings),
      step=jax.jit(functools.partial(train_step, plan=StepPlan(graphdef, optimizer,
                                                               microbatches, split)),
                   in_shardings=(param_shardings, opt_shardings, batch, replicated, replicated),
                   out_shardings=(param_shardings, opt_shardings, replicated),
                   donate_argnums=(0, 1)),
      evaluate=jax.jit(functools.partial(exit_losses, graphdef),
                       in_shardings=(param_shardings, batch), out_shardings=replicated))


def create_model(cfg: ModelConfig, seed: int, mesh: jax.sharding.Mesh) -> FamilialTransformer:
  """The model with every parameter initialised inside jit, born with its rules-table sharding."""
  progs = programs(cfg, mesh)
  with jax.set_mesh(mesh):
    return nnx.merge(progs.graphdef, progs.init_params(seed))


@dataclasses.dataclass
class Trainer:
  """Compiled train and eval steps for one config on one mesh, and the state they update.

  `step_count` is the number of optimizer steps the state has taken; it picks each step's
  learning rate from the schedule.
  """

  cfg: ExperimentConfig
  mesh: jax.sharding.Mesh
  progs: Programs
  params: dict  # nested dict of arrays (nnx.to_pure_dict of the model's state)
  opt_state: Any
  learning_rates: np.ndarray  # [total_steps], the schedule's value at each step
  constants: tuple  # (hyperparameters but the learning rate, exit weights), on the devices
  step_count: int = 0

  @classmethod
  def create(cls, cfg: ExperimentConfig, mesh: jax.sharding.Mesh) -> "Trainer":
    tc = cfg.train
    sharding.check_fits_mesh(cfg.model, tc.batch_size // tc.microbatches, mesh,
                             batch_field="train.batch_size / train.microbatches"
                             if tc.microbatches > 1 else "train.batch_size")
    progs = programs(cfg.model, mesh, tc.microbatches, tc.trainable_last_layers)
    with jax.set_mesh(mesh):
      params = progs.init_params(cfg.train.seed)
      opt_state = progs.init_opt(params)
    learning_rates = np.asarray(learning_rate_schedule(tc)(np.arange(tc.total_steps)), np.float32)
    hparams = {k: np.float32(v) for k, v in hyperparameters(tc, 0.0).items()}
    weights_G = exit_weights(tc, cfg.model.n_exits, tc.exit_warmup_steps)
    constants = jax.device_put((hparams, weights_G), NamedSharding(mesh, PartitionSpec()))
    return cls(cfg, mesh, progs, params, opt_state, learning_rates, constants)

  def warm_start(self) -> None:
    """Replaces the fresh parameters with the train.init_from checkpoint's (famjax.hf)."""
    tc, model = self.cfg.train, self.cfg.model
    dense_cfg, dense = hf.load(tc.init_from)
    hf.check_architecture(model, dense_cfg, tc.init_from)
    params = hf.family_params(model, self.params, dense_cfg, dense, tc.init_exits)
    self.params = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), params,
                               self.params)

  def step(self, tokens_BT: np.ndarray) -> dict:
    batch = sharding.put_batch(tokens_BT, self.mesh)
    hparams, weights_G = self.constants
    if self.step_count < self.cfg.train.exit_warmup_steps:
      weights_G = exit_weights(self.cfg.train, self.cfg.model.n_exits, self.step_count)
    lr = self.learning_rates[min(self.step_count, len(self.learning_rates) - 1)]
    with jax.set_mesh(self.mesh):
      self.params, self.opt_state, metrics = self.progs.step(
          self.params, self.opt_state, batch, {**hparams, "learning_rate": lr}, weights_G)
    self.step_count += 1
    return metrics

  def evaluate(self, batches: list[np.ndarray]) -> np.ndarray:
    """Mean per-exit loss over fixed batches, shape [G]."""
    return self.evaluate_batches(batches).mean(axis=0)

  def evaluate_batches(self, batches: list[np.ndarray]) -> np.ndarray:
    """Per-exit loss of each of the fixed batches, shape [batches, G]."""
    with jax.set_mesh(self.mesh):
      losses = [self.progs.evaluate(self.params, sharding.put_batch(b, self.mesh))
                for b in batches]
    return np.stack(jax.device_get(losses))

  @property
  def state(self) -> dict:
    return {"params": self.params, "opt_state": self.opt_state}

  def load_state(self, state: dict, step: int) -> None:
    self.params, self.opt_state, self.step_count = state["params"], state["opt_state"], step


def _check_finite(step: int, metrics: dict) -> None:
  if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
    raise FloatingPointError(
        f"non-finite training loss at step {step} (loss={metrics['loss']}, per-exit="
        f"{list(metrics['exit_loss'])}, grad_norm={metrics['grad_norm']}); stopped without "
        "saving: the last good checkpoint is intact. Lower train.learning_rate or "
        "train.grad_clip and rerun with the same workdir to resume.")


def train(cfg: ExperimentConfig, workdir: str | Path, mesh: jax.sharding.Mesh | None = None,
          stop_after: int | None = None, tokens: data.TokenData | None = None) -> dict:
  """Trains (or resumes) the family in `workdir`; returns and writes summary.json.

  stop_after pauses the run after that step with a checkpoint, as a preemption would; rerunning
  with the same workdir continues it. `tokens` (from data.load_tokens(cfg.data)) saves reading
  the corpus again when one process trains many runs. The workdir is locked for the run
  (files.WorkdirBusy if another process holds it) and claimed (config.json) only once the run
  can start.
  """
  workdir = Path(workdir)
  tc = cfg.train
  tokens = data.load_tokens(cfg.data) if tokens is None else tokens
  _check_vocabulary(cfg, tokens)
  mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
  proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
  batches = data.train_batches(tokens.train, tc.seq_len, tc.batch_size, tc.seed, **proc)
  val_batches = data.eval_batches(tokens.val, tc.seq_len, tc.batch_size, tc.eval_batches, **proc)
  trainer = Trainer.create(cfg, mesh)

  lock = WorkdirLock(workdir)
  if jax.process_index() == 0:
    lock.acquire()
  try:
    workdir_files.check_identity(workdir, cfg)
    return _train_locked(cfg, workdir, trainer, batches, val_batches, tokens, stop_after)
  finally:
    lock.release()


def _check_vocabulary(cfg: ExperimentConfig, tokens: data.TokenData) -> None:
  """model.vocab_size below the tokenizer's is an error; above it, the extra rows are padding
  (never a target), which the log states."""
  size, have = cfg.model.vocab_size, tokens.vocab_size
  if have > size:
    raise ValueError(f"model.vocab_size={size} is smaller than the {have}-token vocabulary of "
                     f"data.tokenizer={cfg.data.tokenizer!r}: set it to at least {have}")
  if have < size:
    logging.info("model.vocab_size=%d pads the %d-token vocabulary of %s with %d unused rows",
                 size, have, tokens.tokenizer.name, size - have)


def _resume(cfg, workdir, mngr, trainer, batches) -> tuple[int, float]:
  """Loads the latest checkpoint into trainer and batches: (its step, seconds trained), or
  (0, 0.0) for a fresh run."""
  start, elapsed = 0, 0.0
  restored = checkpoint.restore_latest(mngr, trainer.state)
  if restored is not None:
    start, state, data_state = restored
    trainer.load_state(state, start)
    batches.set_state(data_state["batches"])
    elapsed = data_state["elapsed_seconds"]
  if start > cfg.train.total_steps:
    raise ValueError(
        f"train.steps={cfg.train.total_steps} (or train.tokens) is below step {start} of the "
        f"latest checkpoint in {workdir}: that state has trained longer than asked. Ask for at "
        f"least {start} steps, or use a new workdir")
  return start, elapsed


def _summary(cfg, trainer, train_loss, val_loss_VG, seconds: float, fingerprint: str) -> dict:
  """What a finished run reports (summary.json): losses per exit (validation: also over each
  half of the validation batches, whose gap measures the validation set's noise), size and
  cost."""
  acc = accounting.account(cfg.model, cfg.train.seq_len)
  half = len(val_loss_VG) // 2
  halves = [val_loss_VG[:half].mean(0).tolist(), val_loss_VG[half:].mean(0).tolist()] \
      if half else None
  return {
      "exit_layers": list(cfg.model.exit_layers),
      "train_loss": train_loss,
      "val_loss": val_loss_VG.mean(0).tolist(),
      "val_loss_halves": halves,
      "step": trainer.step_count,
      "tokens": trainer.step_count * cfg.train.batch_size * cfg.train.seq_len,
      "params_per_exit": list(acc.params_per_exit),
      "non_embedding_params_per_exit": list(acc.non_embedding_per_exit),
      "params_total": acc.params_total,
      "params_non_embedding": acc.params_non_embedding,
      "flops_per_token": acc.flops_per_token,
      "train_seconds": seconds,
      "corpus_fingerprint": fingerprint,
  }


def _start(cfg, workdir, trainer, start: int, tokenizer) -> None:
  """A fresh run with train.init_from takes the checkpoint's weights (before anything is written,
  so a bad checkpoint leaves the workdir untouched); then the workdir is claimed."""
  fresh_import = start == 0 and bool(cfg.train.init_from)
  if fresh_import:
    trainer.warm_start()
  if jax.process_index() == 0:
    workdir_files.claim(workdir, cfg, start, tokenizer)
    if fresh_import:
      hf.record_source(cfg.train.init_from, workdir)


def _train_locked(cfg, workdir, trainer, batches, val_batches, tokens, stop_after) -> dict:
  tc = cfg.train
  mngr = checkpoint.manager(workdir, tc.keep_checkpoints)
  (start, elapsed), total = _resume(cfg, workdir, mngr, trainer, batches), tc.total_steps
  _start(cfg, workdir, trainer, start, tokens.tokenizer)
  log = workdir_files.MetricsLog(workdir, start, tracking.open_wandb(cfg, workdir))
  profile = tracking.ProfileWindow(tc.profile_steps, workdir / "tensorboard")
  last = total if stop_after is None else max(start, min(total, stop_after))
  tokens_per_step = tc.batch_size * tc.seq_len
  window: list[np.ndarray] = []  # per-exit train losses since the last log line
  bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not tc.progress,
             dynamic_ncols=True)
  began = tic = time.perf_counter()
  tic_step, pending = start, None  # pending: metrics fetched once the next step is dispatched

  def consume(step: int, metrics) -> None:
    nonlocal tic, tic_step
    metrics = jax.device_get(metrics)
    _check_finite(step, metrics)
    window.append(np.asarray(metrics["exit_loss"]))
    if step % tc.log_every == 0 or step == total:
      now = time.perf_counter()
      tokens_per_s = (step - tic_step) * tokens_per_step / max(now - tic, 1e-9)
      train_loss = np.mean(window[-tc.log_every:], axis=0)
      log.write(step, {"train_loss": train_loss.tolist(), "loss": float(metrics["loss"]),
                       "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tokens_per_s})
      bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", tok_s=f"{tokens_per_s:,.0f}")
      tic, tic_step = now, step

  try:
    for step in range(start + 1, last + 1):
      profile.before(step)
      with profile.annotation(step):
        metrics = trainer.step(next(batches))
      profile.after(step, metrics)
      if pending is not None:
        consume(*pending)
      pending = (step, metrics)
      bar.update(1)
      at_eval, at_save = step % tc.eval_every == 0, step % tc.checkpoint_every == 0
      if at_eval or at_save or step == last:
        consume(*pending)
        pending = None
        if at_eval or step == total:
          log.write(step, {"val_loss": trainer.evaluate(val_batches).tolist()})
        if at_save or step == last:
          data_state = {"batches": batches.get_state(),
                        "elapsed_seconds": elapsed + time.perf_counter() - began}
          checkpoint.save(mngr, step, trainer.state, data_state)
  finally:
    profile.close()
    bar.close()
    mngr.wait_until_finished()
    log.close()

  return _finish(cfg, workdir, trainer, val_batches, window,
                 elapsed + time.perf_counter() - began, tokens.fingerprint)


def _finish(cfg, workdir, trainer, val_batches, window, seconds: float, fingerprint: str) -> dict:
  """Writes and returns the run's summary: the final validation loss per exit and the mean of
  the last log window's train losses."""
  val_loss_VG = trainer.evaluate_batches(val_batches)
  if not window:  # resumed a finished run: report the last logged train loss
    last = workdir_files.last_train_loss(workdir)
    window = [] if last is None else [last]
  log_every = cfg.train.log_every
  train_loss = np.mean(window[-log_every:], axis=0).tolist() if window else None
  summary = _summary(cfg, trainer, train_loss, val_loss_VG, seconds, fingerprint)
  workdir_files.write_summary(workdir, summary)
  return summary


def load_model(workdir: str | Path, mesh: jax.sharding.Mesh | None = None):
  """(config, model) of a trained workdir: the parameters of its newest checkpoint that
  restores, without the optimizer state."""
  workdir = Path(workdir)
  cfg = workdir_files.recorded_experiment(workdir)
  if mesh is None:
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
  progs = programs(cfg.model, mesh)
  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(progs.init_params, 0)
  mngr = checkpoint.manager(workdir, cfg.train.keep_checkpoints)
  params = checkpoint.restore_params(mngr, abstract)
  if params is None:
    raise FileNotFoundError(f"{workdir} has no checkpoint whose parameters restore")
  with jax.set_mesh(mesh):
    return cfg, nnx.merge(progs.graphdef, params)
