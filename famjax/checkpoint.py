"""Orbax checkpoints of (params, optimizer state) plus the data-iterator state, restorable on any mesh."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(workdir: str | Path, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict) -> None:
  """Orbax writes into a temporary directory and renames it when complete: a crash loses nothing."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state)))


def restore(mngr: ocp.CheckpointManager, step: int, like: Any) -> tuple[Any, dict]:
  """Restores onto the shardings of `like` (concrete or abstract arrays), whatever mesh wrote it."""
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                        data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]
