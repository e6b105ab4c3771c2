"""The decoding state a relay hands on: each row's tokens, the hidden state leaving the deepest
segment it ran, and the KV caches of those segments; serialised to bytes for another tier."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from famjax.model.sharding import constrain
from famjax.model.transformer import KV

CACHE_AXES = ("layers", "batch", "length", "kv_heads", "kv")


class RelayState(NamedTuple):
  """What a tier that decoded at exit g hands to a deeper one (`exit`: g, 1-based)."""
  tokens_BS: jax.Array  # int32, tokens so far (prompt and generated), padded
  lengths_B: jax.Array  # int32, tokens so far per row
  hidden_BSM: jax.Array  # the hidden state leaving layer l_g, at every position
  segments: tuple  # KV of segments 1..g, [L, B, S, J, H] each
  head: KV | None  # KV of exit g's private block, [B, S, J, H] each, if it has one

  @property
  def exit(self) -> int:
    """The exit (1..G) this state was decoded at."""
    return len(self.segments)


def zeros_kv(cfg, layers: int | None, batch: int, max_len: int) -> KV:
  shape = (batch, max_len, cfg.kv_heads, cfg.head_size)
  shape = shape if layers is None else (layers,) + shape
  axes = CACHE_AXES if layers is not None else CACHE_AXES[1:]
  zeros = lambda: constrain(jnp.zeros(shape, jnp.dtype(cfg.dtype)), axes)
  return KV(zeros(), zeros())


def constrain_kv(kv: KV | None, stacked: bool = True) -> KV | None:
  if kv is None:
    return None
  axes = CACHE_AXES if stacked else CACHE_AXES[1:]
  return KV(constrain(kv.k, axes), constrain(kv.v, axes))


def to_bytes(state: RelayState) -> bytes:
  """What a device sends to a deeper tier: the state's arrays up to the longest row (msgpack)."""
  used = int(np.max(np.asarray(state.lengths_B)))
  trim = lambda a, axis: np.asarray(jax.device_get(a)).take(np.arange(used), axis=axis)
  record = {"max_len": state.tokens_BS.shape[1], "lengths": np.asarray(state.lengths_B),
            "tokens": trim(state.tokens_BS, 1), "hidden": trim(state.hidden_BSM, 1),
            "segments": [{"k": trim(kv.k, 2), "v": trim(kv.v, 2)} for kv in state.segments],
            "head": None if state.head is None else {"k": trim(state.head.k, 1),
                                                     "v": trim(state.head.v, 1)}}
  return serialization.msgpack_serialize(record)


def from_bytes(data: bytes) -> RelayState:
  """The RelayState `to_bytes` wrote, padded back to its cache length."""
  record = serialization.msgpack_restore(data)
  max_len = int(record["max_len"])
  pad = lambda a, axis: jnp.asarray(np.pad(a, [(0, max_len - a.shape[axis]) if i == axis
                                               else (0, 0) for i in range(a.ndim)]))
  segments = tuple(KV(pad(s["k"], 2), pad(s["v"], 2)) for s in record["segments"].values()) \
      if isinstance(record["segments"], dict) else tuple(KV(pad(s["k"], 2), pad(s["v"], 2))
                                                         for s in record["segments"])
  head = None if record["head"] is None else KV(pad(record["head"]["k"], 1),
                                                pad(record["head"]["v"], 1))
  return RelayState(pad(record["tokens"], 1), jnp.asarray(record["lengths"]),
                    pad(record["hidden"], 1), segments, head)
