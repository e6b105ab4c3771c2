"""Sampling the next token from logits: greedy, temperature, top-k and top-p."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def sample(logits_BV, key, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
  """Greedy at temperature 0; else sampling from the temperature-scaled distribution, kept to the
  top_k tokens and to the smallest set of probability >= top_p (nucleus)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_k:
    kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cumulative_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, jnp.sum(cumulative_BV < top_p, -1, keepdims=True),
                                    axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  stop_tokens: tuple[int, ...] = ()
