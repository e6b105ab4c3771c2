"""Device mesh, the one logical-axis rules table, and helpers that place parameters and batches.

Imports no model code: the model imports `constrain` from here.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from famjax.config import MeshConfig, ModelConfig

MESH_AXES = ("data", "model")

# Logical axis -> mesh axis. Embedding and every exit's unembedding are split along the
# vocabulary ("sharded exits"); heads and the MLP hidden dimension along `model`; batch on `data`.
RULES = (
    ("batch", "data"),
    ("vocab", "model"),
    ("heads", "model"),
    ("mlp", "model"),
    ("embed", None),
    ("kv", None),
    ("norm", None),
    ("length", None),
)


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int]:
  """Resolves -1 to the devices the other axis leaves; errors name the field and the device count."""
  data, model = cfg.data, cfg.model
  if data == -1:
    data = n_devices // model if n_devices % model == 0 else 0
  if model == -1:
    model = n_devices // data if n_devices % data == 0 else 0
  if data * model != n_devices:
    raise ValueError(f"mesh.data * mesh.model must equal the {n_devices} available devices "
                     f"(-1 takes the rest); got mesh.data={cfg.data}, mesh.model={cfg.model}")
  return data, model


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def logical_spec(logical_axes) -> PartitionSpec:
  table = dict(RULES)
  return PartitionSpec(*(table[a] if a is not None else None for a in logical_axes))


def constrain(x, logical_axes: tuple[str | None, ...]):
  """Sharding constraint by logical axis names; a no-op outside a mesh."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(logical_axes))


def state_shardings(state, mesh: jax.sharding.Mesh):
  """NamedSharding for every leaf of an NNX state (or a pytree holding one), from RULES."""
  with nnx.logical_axis_rules(RULES):
    specs = nnx.get_partition_spec(state)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def check_fits_mesh(cfg: ModelConfig, batch_size: int, mesh: jax.sharding.Mesh) -> None:
  """Every sharded dimension must split evenly over its mesh axis; errors name field and size."""
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  needs = {"model.n_heads": (cfg.n_heads, "model"), "model.d_ff": (cfg.d_ff, "model"),
           "model.vocab_size": (cfg.vocab_size, "model"), "train.batch_size": (batch_size, "data")}
  for field, (value, axis) in needs.items():
    if value % sizes[axis]:
      raise ValueError(f"{field}={value} must be divisible by mesh.{axis}={sizes[axis]} "
                       f"(it is split over that mesh axis)")


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_spec(("batch", "length")))


def put_batch(batch_BT: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """Places this process's rows of the global batch; on one host that is the whole batch."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch_BT, sharding)
  n_global = batch_BT.shape[0] * jax.process_count()
  return jax.make_array_from_process_local_data(sharding, batch_BT,
                                                (n_global,) + batch_BT.shape[1:])


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process run when an address is given here or in JAX_COORDINATOR_ADDRESS.

  On Cloud TPU and SLURM, jax.distributed discovers everything itself: set JAX_COORDINATOR_ADDRESS
  or pass the address to opt in. With neither, this is a single-process run and nothing happens.
  """
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not address:
    return
  jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                             process_id=process_id)
