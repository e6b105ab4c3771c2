"""Scaling laws as pure JAX functions of a parameter dict and a dict of data columns, in log space.

Parameters are a = log A, b = log B, e = log E and the exponents; every law returns log L.
A law is a name, its parameter names, a log-loss function and its grid of starting points, so a
new functional form is one more `Law(...)`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

Params = Mapping[str, jnp.ndarray]
Data = Mapping[str, jnp.ndarray]

# Hoffmann et al. (2022) grid, as in Epoch AI's replication: 5 x 5 x 5 x 6 x 6 = 4500 starts.
HOFFMANN_GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5), "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0),
}


def chinchilla_log_loss(p: Params, data: Data) -> jnp.ndarray:
  """log L = LSE(a - alpha log N, b - beta log D, e), i.e. L = E + A/N^alpha + B/D^beta."""
  terms = jnp.stack([p["a"] - p["alpha"] * jnp.log(data["N"]),
                     p["b"] - p["beta"] * jnp.log(data["D"]),
                     jnp.broadcast_to(p["e"], jnp.shape(data["N"]))])
  return logsumexp(terms, axis=0)


def familial_log_loss(p: Params, data: Data) -> jnp.ndarray:
  """arXiv 2512.23407: L = (E + A/N^alpha + B/D^beta) * G^gamma."""
  return chinchilla_log_loss(p, data) + p["gamma"] * jnp.log(data["G"])


def branch_log_loss(p: Params, data: Data) -> jnp.ndarray:
  """famjax's form of the branch law for exit g (1-based) of a family with G exits:

  L_g = L_dense(N_g, D) * (1 + P)^alpha_b * (1 + Q)^beta_b, P = g - 1 upstream and Q = G - g
  downstream exits, N_g the exit's sub-model size (column N). The paper (arXiv 2512.23407) reports
  alpha_b = 1e-3 and beta_b = 0.0397 without giving its exact form; this multiplicative form is
  ours.
  """
  upstream = data["exit"] - 1.0
  downstream = data["G"] - data["exit"]
  return (chinchilla_log_loss(p, data) + p["alpha_b"] * jnp.log1p(upstream)
          + p["beta_b"] * jnp.log1p(downstream))


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class Law:
  name: str
  param_names: tuple[str, ...]
  log_loss: Callable[[Params, Data], jnp.ndarray]
  columns: tuple[str, ...]  # data columns the law reads, besides "loss"
  extra_grid: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def grid(self, every: int = 1) -> dict[str, np.ndarray]:
    """Every combination of the Hoffmann grid and this law's own axes, {name: [S]} float64; with
    every=k, every k-th of them (a quick look; small grids can miss the optimum)."""
    if not (isinstance(every, int) and every >= 1):
      raise ValueError(f"grid every must be an integer >= 1; got {every!r}")
    axes = {**HOFFMANN_GRID, **self.extra_grid}
    names = list(axes)
    combos = np.array(list(itertools.product(*(axes[n] for n in names))), dtype=np.float64)
    return {n: combos[::every, i] for i, n in enumerate(names) if n in self.param_names}

  @property
  def grid_names(self) -> tuple[str, ...]:
    """The parameters in the order of the grid's columns: the solver's order."""
    return tuple(n for n in {**HOFFMANN_GRID, **self.extra_grid} if n in self.param_names)


CHINCHILLA = Law("chinchilla", ("a", "b", "e", "alpha", "beta"), chinchilla_log_loss, ("N", "D"))
FAMILIAL = Law("familial", ("a", "b", "e", "alpha", "beta", "gamma"), familial_log_loss,
               ("N", "D", "G"), {"gamma": np.array([-0.05, 0.0, 0.05])})
BRANCH = Law("branch", ("a", "b", "e", "alpha", "beta", "alpha_b", "beta_b"), branch_log_loss,
             ("N", "D", "G", "exit"), {"alpha_b": np.array([0.0, 0.05]),
                                       "beta_b": np.array([0.0, 0.05])})
LAWS = {law.name: law for law in (FAMILIAL, BRANCH, CHINCHILLA)}  # the one registry, report order

# arXiv 2512.23407's published fit, as natural parameters.
PAPER_FAMILIAL = {"E": 1.0059, "A": 403.4289, "alpha": 0.2982, "B": 2980.058, "beta": 0.3412,
                  "gamma": 0.0333}


_NATURAL_NAMES = {"e": "E", "a": "A", "b": "B"}


def to_natural_name(name: str) -> str:
  """e -> E, a -> A, b -> B (log parameters to natural ones); other names pass through."""
  return _NATURAL_NAMES.get(name, name)


def _convert(params: Mapping, rename: Mapping[str, str], fn):
  out = {}
  for k, v in params.items():
    value = fn(np.asarray(v, np.float64)) if k in rename else np.asarray(v, np.float64)
    out[rename.get(k, k)] = float(value) if value.ndim == 0 else value
  return out


def to_log_params(natural: Mapping) -> dict:
  """{E, A, B, ...} -> {e, a, b, ...} (exponents pass through); scalars or arrays."""
  return _convert(natural, {"E": "e", "A": "a", "B": "b"}, np.log)


def to_natural_params(logp: Mapping) -> dict:
  """{e, a, b, ...} -> {E, A, B, ...}; scalars or arrays."""
  return _convert(logp, _NATURAL_NAMES, np.exp)


def loss(law: Law, params: Params, data: Data) -> jnp.ndarray:
  return jnp.exp(law.log_loss(params, data))
