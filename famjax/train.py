"""Training: Optax AdamW on the weighted sum of per-exit losses, Orbax resume, JSONL/TensorBoard logs."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from famjax import accounting, checkpoint, data, sharding
from famjax.config import ExperimentConfig, TrainConfig
from famjax.files import atomic_write_text


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


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW; norm scales (1-D parameters) get no weight decay."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(tc.grad_clip),
      optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay,
                  mask=decay_mask))


def exit_losses(graphdef: nnx.GraphDef, params: nnx.State, tokens_BT: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy of every exit, ce_G (float32)."""
  model = nnx.merge(graphdef, params)
  logits_GBTV = model(tokens_BT[:, :-1])
  ce_GBT = optax.softmax_cross_entropy_with_integer_labels(logits_GBTV, tokens_BT[None, :, 1:])
  return ce_GBT.mean(axis=(1, 2))


def train_step(params, opt_state, tokens_BT, *, graphdef, optimizer, weights_G):
  def loss_fn(p):
    ce_G = exit_losses(graphdef, p, tokens_BT)
    return jnp.dot(weights_G, ce_G), ce_G

  (loss, ce_G), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, opt_state, {"loss": loss, "exit_loss": ce_G, "grad_norm": optax.global_norm(grads)}


@dataclasses.dataclass
class Trainer:
  """Compiled train and eval steps for one config on one mesh, and the state they update."""

  cfg: ExperimentConfig
  mesh: jax.sharding.Mesh
  graphdef: nnx.GraphDef
  params: nnx.State
  opt_state: Any
  step_fn: Any
  eval_fn: Any

  @classmethod
  def create(cls, cfg: ExperimentConfig, mesh: jax.sharding.Mesh) -> "Trainer":
    sharding.check_fits_mesh(cfg.model, cfg.train.batch_size, mesh)
    model = sharding.create_model(cfg.model, cfg.train.seed, mesh)
    graphdef, params = nnx.split(model)
    optimizer = make_optimizer(cfg.train)
    param_shardings = sharding.state_shardings(params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, params), param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding))
    with jax.set_mesh(mesh):
      opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    weights_G = jnp.asarray(cfg.train.weights_for(cfg.model.n_exits), jnp.float32)
    batch = sharding.batch_sharding(mesh)
    step_fn = jax.jit(
        functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, weights_G=weights_G),
        in_shardings=(param_shardings, opt_shardings, batch),
        out_shardings=(param_shardings, opt_shardings, replicated),
        donate_argnums=(0, 1))
    eval_fn = jax.jit(functools.partial(exit_losses, graphdef),
                      in_shardings=(param_shardings, batch), out_shardings=replicated)
    return cls(cfg, mesh, graphdef, params, opt_state, step_fn, eval_fn)

  def step(self, tokens_BT: np.ndarray) -> dict:
    batch = sharding.put_batch(tokens_BT, self.mesh)
    with jax.set_mesh(self.mesh):
      self.params, self.opt_state, metrics = self.step_fn(self.params, self.opt_state, batch)
    return metrics

  def evaluate(self, batches: list[np.ndarray]) -> np.ndarray:
    """Mean per-exit loss over fixed batches, shape [G]."""
    with jax.set_mesh(self.mesh):
      losses = [self.eval_fn(self.params, sharding.put_batch(b, self.mesh)) for b in batches]
    return np.mean(np.stack(jax.device_get(losses)), axis=0)

  @property
  def state(self) -> dict:
    return {"params": self.params, "opt_state": self.opt_state}

  def load_state(self, state: dict) -> None:
    self.params, self.opt_state = state["params"], state["opt_state"]


class MetricsLog:
  """Appends records to WORKDIR/metrics.jsonl and mirrors scalars to TensorBoard (process 0 only)."""

  def __init__(self, workdir: Path, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    self._tb = None
    if not self.enabled:
      return
    if resume_step and self.path.exists():  # drop records past the checkpoint we resume from
      kept = [l for l in self.path.read_text().splitlines()
              if l.strip() and json.loads(l)["step"] <= resume_step]
      atomic_write_text(self.path, "".join(l + "\n" for l in kept))
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(str(workdir / "tensorboard"))
    self._file = self.path.open("a")

  def write(self, step: int, record: dict) -> None:
    if not self.enabled:
      return
    self._file.write(json.dumps({"step": step, **record}) + "\n")
    self._file.flush()
    for key, value in record.items():
      for i, v in enumerate(np.atleast_1d(value)):
        name = key if np.ndim(value) == 0 else f"{key}/exit{i}"
        self._tb.add_scalar(name, float(v), step)

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()


def _check_finite(step: int, metrics: dict) -> None:
  if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
    raise FloatingPointError(
        f"non-finite training loss at step {step} (loss={metrics['loss']}, per-exit="
        f"{list(metrics['exit_loss'])}, grad_norm={metrics['grad_norm']}); stopped without "
        "saving: the last good checkpoint is intact. Lower train.learning_rate or "
        "train.grad_clip and rerun with the same workdir to resume.")


def _run_identity(cfg: ExperimentConfig) -> dict:
  """The fields a resumed run must share with the run that wrote the workdir."""
  tc = cfg.train
  identity = {"model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data),
              "seed": tc.seed, "batch_size": tc.batch_size, "seq_len": tc.seq_len}
  return json.loads(json.dumps(identity))  # tuples become lists, as when read back


def _claim_workdir(workdir: Path, cfg: ExperimentConfig) -> None:
  path = workdir / "config.json"
  identity = _run_identity(cfg)
  if path.exists():
    previous = json.loads(path.read_text())
    if previous["identity"] != identity:
      changed = sorted(k for k in identity if previous["identity"].get(k) != identity[k])
      raise ValueError(f"workdir {workdir} holds a run with a different {changed}; use a new "
                       "--workdir or the original config")
  atomic_write_text(path, json.dumps({"identity": identity, "config": dataclasses.asdict(cfg)},
                                     indent=1, default=list))


def train(cfg: ExperimentConfig, workdir: str | Path, mesh: jax.sharding.Mesh | None = None,
          stop_after: int | None = None) -> dict:
  """Trains (or resumes) the family in `workdir`; returns and writes summary.json.

  stop_after pauses the run after that step with a checkpoint, as a preemption would; rerunning
  with the same workdir continues it.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  tc = cfg.train
  tokens = data.load_tokens(cfg.data)
  if tokens.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                     f"{tokens.vocab_size}-token vocabulary of data.tokenizer={cfg.data.tokenizer!r}")
  if jax.process_index() == 0:
    _claim_workdir(workdir, cfg)
  mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
  trainer = Trainer.create(cfg, mesh)
  proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
  batches = data.train_batches(tokens.train, tc.seq_len, tc.batch_size, tc.seed, **proc)
  val_batches = data.eval_batches(tokens.val, tc.seq_len, tc.batch_size, tc.eval_batches, **proc)

  mngr = checkpoint.manager(workdir, tc.keep_checkpoints)
  start = mngr.latest_step() or 0
  if start:
    state, data_state = checkpoint.restore(mngr, start, trainer.state)
    trainer.load_state(state)
    batches.set_state(data_state)
  log = MetricsLog(workdir, start)
  total = tc.total_steps
  last = total if stop_after is None else min(total, stop_after)
  tokens_per_step = tc.batch_size * tc.seq_len
  window: list[np.ndarray] = []  # per-exit train losses since the last log line
  bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not tc.progress,
             dynamic_ncols=True)
  tic, tic_step = time.perf_counter(), start
  pending = None  # previous step's metrics, fetched after the next step is dispatched

  def consume(step: int, metrics) -> None:
    nonlocal tic, tic_step
    metrics = jax.device_get(metrics)
    _check_finite(step, metrics)
    window.append(np.asarray(metrics["exit_loss"]))
    if step % tc.log_every == 0 or step == total:
      elapsed = time.perf_counter() - tic
      tokens_per_s = (step - tic_step) * tokens_per_step / max(elapsed, 1e-9)
      train_loss = np.mean(window[-tc.log_every:], axis=0)
      log.write(step, {"train_loss": train_loss.tolist(), "loss": float(metrics["loss"]),
                       "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tokens_per_s})
      bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", tok_s=f"{tokens_per_s:,.0f}")
      tic, tic_step = time.perf_counter(), step

  try:
    for step in range(start + 1, last + 1):
      metrics = trainer.step(next(batches))
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
          checkpoint.save(mngr, step, trainer.state, batches.get_state())
  finally:
    bar.close()
    mngr.wait_until_finished()
    log.close()

  val_loss = trainer.evaluate(val_batches)
  if not window:  # resumed a finished run: report the last logged train loss
    window = [np.asarray(_last_record(workdir, "train_loss"))]
  acc = accounting.account(cfg.model, tc.seq_len)
  summary = {
      "exit_layers": list(cfg.model.exit_layers),
      "train_loss": np.mean(window[-tc.log_every:], axis=0).tolist(),
      "val_loss": val_loss.tolist(),
      "step": last,
      "tokens": last * tokens_per_step,
      "params_per_exit": list(acc.params_per_exit),
      "non_embedding_params_per_exit": list(acc.non_embedding_per_exit),
      "params_total": acc.params_total,
      "flops_per_token": acc.flops_per_token,
      "corpus_fingerprint": tokens.fingerprint,
  }
  if jax.process_index() == 0:
    atomic_write_text(workdir / "summary.json", json.dumps(summary, indent=1))
  return summary


def _last_record(workdir: Path, key: str):
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l]
  return [r[key] for r in lines if key in r][-1]
