"""Scaling laws as pure JAX functions of a parameter dict and a dict of data columns, in log space.

Parameters are a = log A, b = log B, e = log E and the exponents; every law returns log L.
A law is a name, its parameter names, a log-loss function and its fit starts (a lattice of
starting points), so a new functional form is one more `Law(...)`.
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

# Hoffmann et al. (2022) starts, as in Epoch AI's replication: 5 x 5 x 5 x 6 x 6 = 4500 starts.
HOFFMANN_STARTS = {
    "alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5), "a": np.arange(0.0, 25.1, 5.0), "b": np.arange(0.0, 25.1, 5.0),
}


def _with_data_and_floor(size_R, p: Params, data: Data) -> jnp.ndarray:
  """log(exp(size_R) + B/D^beta + E): the Chinchilla form around a model-size term in log space."""
  return logsumexp(jnp.stack([size_R, p["b"] - p["beta"] * jnp.log(data["D"]),
                              jnp.broadcast_to(p["e"], jnp.shape(data["N"]))]), axis=0)


def chinchilla_log_loss(p: Params, data: Data) -> jnp.ndarray:
  """log L = LSE(a - alpha log N, b - beta log D, e), i.e. L = E + A/N^alpha + B/D^beta."""
  return _with_data_and_floor(p["a"] - p["alpha"] * jnp.log(data["N"]), p, data)


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


MAX_EXITS = 64  # the largest G that exit-size laws sum over (a static range, masked per row)
D_REFERENCE = 1e6  # gamma_d's gamma is the exponent at D = 1M tokens


def _exit_size_log_factor(alpha, g_R):
  """[R] log((1/G) sum_{g=1..G} (G/g)^alpha): a family's mean A/N_g^alpha over A/N^alpha when
  exit g is a model of g/G of the backbone's N (evenly spaced exits, equal exit weights)."""
  g_X = jnp.arange(1.0, MAX_EXITS + 1.0)
  log_ratio_RX = jnp.log(g_R)[:, None] - jnp.log(g_X)[None, :]
  masked_RX = jnp.where(g_X[None, :] <= g_R[:, None], alpha * log_ratio_RX, -jnp.inf)
  return logsumexp(masked_RX, axis=1) - jnp.log(g_R)


def size_only_log_loss(p: Params, data: Data) -> jnp.ndarray:
  """Each exit a dense model of its own size g/G * N, no sharing cost: L = mean_g (E +
  A/(gN/G)^alpha + B/D^beta)."""
  g_R = jnp.broadcast_to(data["G"], jnp.shape(data["N"]))
  size_R = p["a"] - p["alpha"] * jnp.log(data["N"]) + _exit_size_log_factor(p["alpha"], g_R)
  return _with_data_and_floor(size_R, p, data)


def submodel_log_loss(p: Params, data: Data) -> jnp.ndarray:
  """size_only times an interference factor G^gamma: what sharing one backbone costs beyond the
  exits' own sizes."""
  return size_only_log_loss(p, data) + p["gamma"] * jnp.log(data["G"])


def gamma_d_log_loss(p: Params, data: Data) -> jnp.ndarray:
  """The paper's law with gamma growing in log tokens: gamma(D) = gamma + gamma_slope ln(D/1M)."""
  gamma_R = p["gamma"] + p["gamma_slope"] * jnp.log(data["D"] / D_REFERENCE)
  return chinchilla_log_loss(p, data) + gamma_R * jnp.log(data["G"])


def a_penalty_log_loss(p: Params, data: Data) -> jnp.ndarray:
  """G penalises the model-size term only: L = E + A G^gamma / N^alpha + B/D^beta."""
  size_R = p["a"] + p["gamma"] * jnp.log(data["G"]) - p["alpha"] * jnp.log(data["N"])
  return _with_data_and_floor(size_R, p, data)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class Law:
  name: str
  param_names: tuple[str, ...]
  log_loss: Callable[[Params, Data], jnp.ndarray]
  columns: tuple[str, ...]  # data columns the law reads, besides "loss"
  extra_starts: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  max_G: int | None = None  # the largest G the law can evaluate (None: any)

  def starts(self, every: int = 1) -> dict[str, np.ndarray]:
    """Every combination of the Hoffmann starts and this law's own axes, {name: [S]} float64; with
    every=k, every k-th of them (a quick look; few starts can miss the optimum)."""
    if not (isinstance(every, int) and every >= 1):
      raise ValueError(f"starts every must be an integer >= 1; got {every!r}")
    axes = {**HOFFMANN_STARTS, **self.extra_starts}
    names = list(axes)
    combos = np.array(list(itertools.product(*(axes[n] for n in names))), dtype=np.float64)
    return {n: combos[::every, i] for i, n in enumerate(names) if n in self.param_names}

  @property
  def start_names(self) -> tuple[str, ...]:
    """The parameters in the order of the starts' columns: the solver's order."""
    return tuple(n for n in {**HOFFMANN_STARTS, **self.extra_starts} if n in self.param_names)


_GAMMA_STARTS = {"gamma": np.array([-0.05, 0.0, 0.05])}
CHINCHILLA = Law("chinchilla", ("a", "b", "e", "alpha", "beta"), chinchilla_log_loss, ("N", "D"))
FAMILIAL = Law("familial", ("a", "b", "e", "alpha", "beta", "gamma"), familial_log_loss,
               ("N", "D", "G"), _GAMMA_STARTS)
BRANCH = Law("branch", ("a", "b", "e", "alpha", "beta", "alpha_b", "beta_b"), branch_log_loss,
             ("N", "D", "G", "exit"), {"alpha_b": np.array([0.0, 0.05]),
                                       "beta_b": np.array([0.0, 0.05])})
LAWS = {law.name: law for law in (FAMILIAL, BRANCH, CHINCHILLA)}  # a study's laws, report order

GAMMA_D = Law("gamma_d", ("a", "b", "e", "alpha", "beta", "gamma", "gamma_slope"),
              gamma_d_log_loss, ("N", "D", "G"), {**_GAMMA_STARTS, "gamma_slope": np.zeros(1)})
SUBMODEL = Law("submodel", FAMILIAL.param_names, submodel_log_loss, ("N", "D", "G"),
               _GAMMA_STARTS, MAX_EXITS)
A_PENALTY = Law("a_penalty", FAMILIAL.param_names, a_penalty_log_loss, ("N", "D", "G"),
                _GAMMA_STARTS)
SIZE_ONLY = Law("size_only", CHINCHILLA.param_names, size_only_log_loss, ("N", "D", "G"),
                max_G=MAX_EXITS)
# Familial laws that `compare` ranks on the same rows (a family's exit-weighted mean loss, N its
# backbone), by name; "paper" is FAMILIAL, arXiv 2512.23407's form.
CANDIDATES = {"paper": FAMILIAL, "gamma_d": GAMMA_D, "submodel": SUBMODEL,
              "a_penalty": A_PENALTY, "size_only": SIZE_ONLY}

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
