"""AdamW with its learning-rate schedule; the hyperparameters are state inputs, so that runs of one
shape share one compiled step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from famjax.train.config import TrainConfig


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
