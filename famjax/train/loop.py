"""The training loop of one run: the Trainer (its model, optimizer state and compiled programs),
`train` (claim the workdir, resume from the newest Orbax checkpoint, log, evaluate, summarise) and
`load_model` for a trained run. What the loop writes into the workdir (identity, config history,
metrics, summary) is workdir_files.py's."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from famjax import data
from famjax.common.files import WorkdirLock
from famjax.hf import checkpoint_import
from famjax.model import counts, sharding
from famjax.model.config import MeshConfig
from famjax.train import checkpoint, telemetry, workdir_files
from famjax.train.config import ExperimentConfig
from famjax.train.optimizer import hyperparameters, learning_rate_schedule
from famjax.train.step import Programs, exit_weights, programs


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
    dense_cfg, dense = checkpoint_import.load(tc.init_from)
    checkpoint_import.check_architecture(model, dense_cfg, tc.init_from)
    params = checkpoint_import.family_params(model, self.params, dense_cfg, dense, tc.init_exits)
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


def check_finite(step: int, metrics: dict) -> None:
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
  check_vocabulary(cfg, tokens)
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


def check_vocabulary(cfg: ExperimentConfig, tokens: data.TokenData) -> None:
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


def run_summary(cfg, step_count: int, train_loss, val_loss_VG, seconds: float,
                fingerprint: str) -> dict:
  """What a finished run reports (summary.json): losses per exit (validation: also over each
  half of the validation batches, whose gap measures the validation set's noise), size and
  cost."""
  acc = counts.account(cfg.model, cfg.train.seq_len)
  half = len(val_loss_VG) // 2
  halves = [val_loss_VG[:half].mean(0).tolist(), val_loss_VG[half:].mean(0).tolist()] \
      if half else None
  return {
      "exit_layers": list(cfg.model.exit_layers),
      "train_loss": train_loss,
      "val_loss": val_loss_VG.mean(0).tolist(),
      "val_loss_halves": halves,
      "step": step_count,
      "tokens": step_count * cfg.train.batch_size * cfg.train.seq_len,
      "params_per_exit": list(acc.params_per_exit),
      "non_embedding_params_per_exit": list(acc.non_embedding_per_exit),
      "params_total": acc.params_total,
      "params_non_embedding": acc.params_non_embedding,
      "flops_per_token": acc.flops_per_token,
      "train_seconds": seconds,
      "corpus_fingerprint": fingerprint,
      "versions": software_versions(),
  }


VERSIONED = ("famjax", "jax", "jaxlib", "flax", "optax", "numpy")


def software_versions() -> dict[str, str]:
  """The installed versions of famjax and the libraries whose numerics a run depends on, and the
  backend JAX ran on: what summary.json records, so that runs of other versions are told apart."""
  from importlib import metadata
  out = {name: metadata.version(name) for name in VERSIONED}
  out["backend"] = jax.default_backend()
  return out


def _start(cfg, workdir, trainer, start: int, tokenizer) -> None:
  """A fresh run with train.init_from takes the checkpoint's weights (before anything is written,
  so a bad checkpoint leaves the workdir untouched); then the workdir is claimed."""
  fresh_import = start == 0 and bool(cfg.train.init_from)
  if fresh_import:
    trainer.warm_start()
  if jax.process_index() == 0:
    workdir_files.claim(workdir, cfg, start, tokenizer)
    if fresh_import:
      checkpoint_import.save_source_files(cfg.train.init_from, workdir)


def _train_locked(cfg, workdir, trainer, batches, val_batches, tokens, stop_after) -> dict:
  tc = cfg.train
  mngr = checkpoint.manager(workdir, tc.keep_checkpoints)
  (start, elapsed), total = _resume(cfg, workdir, mngr, trainer, batches), tc.total_steps
  _start(cfg, workdir, trainer, start, tokens.tokenizer)
  log = workdir_files.MetricsLog(workdir, start, telemetry.open_wandb(cfg, workdir))
  profile = telemetry.ProfileWindow(tc.profile_steps, workdir / "tensorboard")
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
    check_finite(step, metrics)
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
  summary = run_summary(cfg, trainer.step_count, train_loss, val_loss_VG, seconds, fingerprint)
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
