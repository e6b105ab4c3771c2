"""Bootstrap resamples as row multiplicities: rows drawn with replacement, or whole groups."""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class Resampling(NamedTuple):
  """Bootstrap resamples: n of them, drawn with a PRNG `key` (or an integer seed), of rows or,
  given `groups` (one label of any kind per row, concrete), of whole groups."""
  n: int
  key: jax.Array | int = 0
  groups: Sequence | None = None

  def counts(self, n_rows: int) -> jax.Array:
    """[n, n_rows] row multiplicities (float64; run inside jax.enable_x64)."""
    key = jax.random.key(self.key) if isinstance(self.key, int) else self.key
    groups = self.groups
    if groups is not None:
      groups = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    return resample_counts(key, n_rows, self.n, groups)


def resample_counts(key, n_rows: int, n: int, groups=None) -> jax.Array:
  """[n, R] row multiplicities of n bootstrap resamples: rows drawn with replacement, or whole
  groups (integer labels 0..n_groups-1, one per row, concrete) if given. Pure JAX."""
  n_groups = n_rows if groups is None else int(np.max(groups)) + 1
  counts = _group_counts(key, n, n_groups)
  return counts if groups is None else counts[:, np.asarray(groups)]


@functools.partial(jax.jit, static_argnums=(1, 2))  # one program, not an eager op per step
def _group_counts(key, n: int, n_groups: int) -> jax.Array:
  """[n, n_groups] counts of n_groups draws with replacement, n times."""
  draws = jax.random.randint(key, (n, n_groups), 0, n_groups)
  return jnp.zeros((n, n_groups), jnp.float64).at[jnp.arange(n)[:, None], draws].add(1.0)
