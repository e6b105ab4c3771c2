"""The compiled programs of a run: parameter init, optimizer init, the train step (weighted sum of
per-exit losses, microbatched) and evaluation. They depend on the model config and the mesh only:
the learning rate, the other hyperparameters and the exit weights are inputs, so runs that differ
in steps, budgets or schedules (an IsoFLOP sweep) share one compilation per model shape."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from famjax.model import sharding
from famjax.model.config import ModelConfig
from famjax.model.transformer import FamilialTransformer
from famjax.train import trainable_params
from famjax.train.config import TrainConfig
from famjax.train.optimizer import make_optimizer, with_hyperparameters
from famjax.train.trainable_params import merge as merge_trainable


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
class StepSpec:
  """What a train step is besides its inputs: the model's graph, the optimizer, gradient
  accumulation over `microbatches`, and `split` (params -> (trainable, frozen), see
  famjax.train.trainable_params; None: everything trains)."""

  graphdef: nnx.GraphDef
  optimizer: optax.GradientTransformation
  microbatches: int = 1
  split: Any = None


def train_step(params, opt_state, tokens_BT, hparams, weights_G, *, plan: StepSpec):
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
  update: Any  # step before jit, which famjax.train.cohort vmaps over runs


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
      trainable_params.split, cfg=cfg, last_layers=trainable_last_layers)
  trained = (lambda params: split(params)[0]) if split else (lambda params: params)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, trained(abstract_params)),
      trained(param_shardings),
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))
  batch = sharding.batch_sharding(mesh)
  update = functools.partial(train_step, plan=StepSpec(graphdef, optimizer, microbatches, split))

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
      step=jax.jit(update,
                   in_shardings=(param_shardings, opt_shardings, batch, replicated, replicated),
                   out_shardings=(param_shardings, opt_shardings, replicated),
                   donate_argnums=(0, 1)),
      evaluate=jax.jit(functools.partial(exit_losses, graphdef),
                       in_shardings=(param_shardings, batch), out_shardings=replicated),
      update=update)


def create_model(cfg: ModelConfig, seed: int, mesh: jax.sharding.Mesh) -> FamilialTransformer:
  """The model with every parameter initialised inside jit, born with its rules-table sharding."""
  progs = programs(cfg, mesh)
  with jax.set_mesh(mesh):
    return nnx.merge(progs.graphdef, progs.init_params(seed))
