"""Device mesh, the one logical-axis rules table, and helpers that place parameters and batches.

Imports no model code: the model imports `constrain` from here.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from famjax.model.config import MeshConfig, ModelConfig

MESH_AXES = ("data", "fsdp", "model")

# Logical axis -> mesh axis: the one table. Parameters: the embedding and every exit's unembedding
# are split along the vocabulary ("sharded exits"), query and key/value heads (and the KV cache's
# heads) and the MLP hidden dimension along
# `model`, and the d_model dimension of every matrix along `fsdp` (fully-sharded data parallel:
# each device keeps 1/fsdp of the parameters and optimizer state and gathers a layer's weights
# when it runs it). Activations: the batch over `data` and `fsdp`; their d_model dimension
# ("act_embed") is never split. "layers" is the stacked axis of scanned blocks, never split.
RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("kv", None),
    ("norm", None),
    ("length", None),
    ("layers", None),
)


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
  """Resolves -1 to the devices the other axes leave; errors name the fields and the count."""
  sizes = [cfg.data, cfg.fsdp, cfg.model]
  if -1 in sizes:
    known = int(np.prod([s for s in sizes if s != -1]))
    sizes[sizes.index(-1)] = n_devices // known if n_devices % known == 0 else 0
  if int(np.prod(sizes)) != n_devices:
    raise ValueError(f"mesh.data * mesh.fsdp * mesh.model must equal the {n_devices} available "
                     f"devices (-1 takes the rest); got mesh.data={cfg.data}, "
                     f"mesh.fsdp={cfg.fsdp}, mesh.model={cfg.model}")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


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


def check_fits_mesh(cfg: ModelConfig, batch_size: int, mesh: jax.sharding.Mesh,
                    batch_field: str = "train.batch_size") -> None:
  """Every sharded dimension must split evenly over its mesh axis; errors name field and size.
  `batch_size` is the batch one pass runs (a microbatch under gradient accumulation)."""
  sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
  needs = {"model.n_heads": (cfg.n_heads, ("model",)),
           "model.n_kv_heads (0: n_heads)": (cfg.kv_heads, ("model",)),
           "model.d_ff": (cfg.d_ff, ("model",)),
           "model.vocab_size": (cfg.vocab_size, ("model",)),
           "model.d_model": (cfg.d_model, ("fsdp",)),
           batch_field: (batch_size, ("data", "fsdp"))}
  for field, (value, axes) in needs.items():
    size = int(np.prod([sizes[a] for a in axes]))
    if value % size:
      where = " * ".join(f"mesh.{a}={sizes[a]}" for a in axes)
      raise ValueError(f"{field}={value} must be divisible by {where} (it is split over "
                       f"{'those mesh axes' if len(axes) > 1 else 'that mesh axis'})")


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
