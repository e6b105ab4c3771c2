"""Which parameters train (train.trainable): the split of a parameter tree into the part the
optimizer updates and the frozen rest, which gets no gradient and no optimizer state.

Backbone layers freeze by whole segments: a segment's layers are one stacked array, so
"exits+last_K" needs K to end where an exit's segment ends (checked by ExperimentConfig).
"""

from __future__ import annotations

from flax import traverse_util

from famjax.model.config import ModelConfig


def is_trainable(cfg: ModelConfig, last_layers: int | None, path: tuple) -> bool:
  """Whether the parameter at `path` (nnx.to_pure_dict keys) trains: every one when last_layers
  is None; else the exit heads' (norms, private blocks, their own or the shared unembedding)
  and the segments inside the last `last_layers` backbone layers."""
  if last_layers is None:
    return True
  if path[0] == "exits":
    return True
  if path[0] == "segments":
    first_layer = ((0,) + cfg.exit_layers)[path[1]]
    return first_layer >= cfg.n_layers - last_layers
  return False


def split(params: dict, cfg: ModelConfig, last_layers: int | None) -> tuple[dict, dict]:
  """(trainable, frozen): two nested dicts that `merge` joins back into params."""
  flat = traverse_util.flatten_dict(params)
  trainable = {k: v for k, v in flat.items() if is_trainable(cfg, last_layers, k)}
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable: dict, frozen: dict) -> dict:
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(trainable),
                                       **traverse_util.flatten_dict(frozen)})
