"""What a fit solves and how: the two values that every part of the fitter passes on.

A `Problem` is a law, its free parameters, the data, the parameters held fixed and the Huber
delta; a `Solver` is the stopping rules and the number of lanes. Both are pytrees whose static
parts (law, names, delta, lanes) are part of the tree's structure, so they go through jax.jit as
ordinary arguments. `Coordinates` are a start's solver coordinates, and `whitening` the one way
famjax chooses them.

Shape letters: S starts, P parameters, R data rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from famjax.scaling.laws import Law

DEFAULT_DELTA = 1e-3
DEFAULT_LANES = 256  # vmapped solver lanes that a queue of starts streams through


class StopRules(NamedTuple):
  """When a start stops (every field is a traced input: changing one compiles nothing)."""
  maxiter: int = 1000  # L-BFGS iterations
  tol: float = 1e-9  # converged: gradient norm <= tol (objectives here are ~1e-3) ...
  # ... or a step without a failed line search lowered the objective by < ftol of it: Huber
  # kinks can keep the gradient norm from ever reaching tol (scipy's L-BFGS-B stops so too)
  ftol: float = 1e-10
  maxls: int = 20  # line-search trials per iteration, as scipy's L-BFGS-B


@functools.partial(jax.tree_util.register_dataclass, data_fields=["stop"],
                   meta_fields=["lanes"])
@dataclasses.dataclass(frozen=True)
class Solver:
  stop: StopRules = StopRules()
  lanes: int = DEFAULT_LANES


def row_losses(params, data, *, law: Law, delta: float, fixed: Mapping | None = None):
  """[R] Huber_delta(log loss_i - law.log_loss(params, data)_i): each row's term of `objective`."""
  residual_R = jnp.log(data["loss"]) - law.log_loss({**(fixed or {}), **params}, data)
  return optax.losses.huber_loss(residual_R, delta=delta)


def objective(params, data, weights_R, *, law: Law, delta: float, fixed: Mapping | None = None):
  """sum_i w_i Huber_delta(log loss_i - law.log_loss(params, data)_i) (Hoffmann et al. 2022)."""
  return jnp.sum(weights_R * row_losses(params, data, law=law, delta=delta, fixed=fixed))


def _float64(value):
  """numpy float64 for a concrete value; a traced one (inside jit, vmap, grad) as it is."""
  return value if isinstance(value, jax.core.Tracer) else np.asarray(value, np.float64)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["data", "fixed"],
                   meta_fields=["law", "names", "delta"])
@dataclasses.dataclass(frozen=True)
class Problem:
  """`law` fitted to `data` ({"N", "D", ..., "loss"}: [R] float64) in its free parameters
  `names` (the solver's order), with `fixed` ones held constant."""
  law: Law
  names: tuple[str, ...]
  data: dict
  fixed: dict
  delta: float = DEFAULT_DELTA

  @property
  def n_rows(self) -> int:
    return self.data["loss"].shape[0]

  def params(self, x_P) -> dict:
    return dict(zip(self.names, x_P))

  def row_losses(self, x_P):
    return row_losses(self.params(x_P), self.data, law=self.law, delta=self.delta,
                      fixed=self.fixed)

  def objective(self, x_P, weights_R):
    return objective(self.params(x_P), self.data, weights_R, law=self.law, delta=self.delta,
                     fixed=self.fixed)

  @classmethod
  def of(cls, law: Law, data: Mapping, *, fixed: Mapping | None = None,
         delta: float = DEFAULT_DELTA) -> "Problem":
    """`law` fitted to `data` ({"N", "D", ..., "loss"}: [R] each) in its parameters other than
    the `fixed` ones, in the order of its starts. Concrete data are kept as float64 numpy arrays
    (host copies, whatever JAX's 64-bit mode); traced ones pass through, for a Problem built
    inside jit, vmap or grad."""
    fixed = {k: _float64(v) for k, v in (fixed or {}).items()}
    names = tuple(k for k in law.start_names if k not in fixed)
    return cls(law, names, {k: _float64(v) for k, v in data.items()}, fixed, delta)


def as_data(data: Mapping) -> dict[str, jnp.ndarray]:
  return {k: jnp.asarray(np.asarray(v, dtype=np.float64)) for k, v in data.items()}


def start_points(p: Problem, starts: Mapping | None = None, *, every: int = 1,
                distinct: bool = False) -> np.ndarray:
  """[S, P] fit starts ({name: [S]}; the law's own, thinned to every k-th
  point, by default) in the free parameters, in the solver's order. `distinct`: each point once
  (with a parameter fixed, the starts repeat the others once per value of the fixed one)."""
  starts = p.law.starts(every) if starts is None else starts
  missing = [k for k in p.names if k not in starts]
  if missing:
    raise ValueError(f"starts: no column for parameter(s) {missing}; it needs {list(p.names)}")
  points_SP = np.stack([np.asarray(starts[k], np.float64) for k in p.names], -1)
  return np.unique(points_SP, axis=0) if distinct else points_SP



class Coordinates(NamedTuple):
  """Solver coordinates z of parameters x: x = origin + basis @ z, for one point ([P], [P, P])
  or one per start ([S, P], [S, P, P])."""
  origin: np.ndarray
  basis: np.ndarray

  @classmethod
  def identity(cls, n_params: int) -> "Coordinates":
    return cls(np.zeros(n_params), np.eye(n_params))

  def to_solver(self, x_SP: np.ndarray) -> np.ndarray:
    return np.linalg.solve(self.basis, (x_SP - self.origin).T).T

  def to_params(self, z_SP: np.ndarray) -> np.ndarray:
    return self.origin + z_SP @ self.basis.T


def whitening(hessian_SPP, x_SP, xp=jnp) -> Coordinates:
  """Coordinates centred on each x_SP[s] in which hessian_SPP[s] is the identity (eigenvalues
  in absolute value, floored at 1e-12 of the largest); the law's own axes where it is not
  finite. `xp`: numpy on the host, jax.numpy in traced code (one code, either library)."""
  p = x_SP.shape[-1]
  hessian_SPP = (hessian_SPP + xp.swapaxes(hessian_SPP, -1, -2)) / 2
  finite_S = xp.all(xp.isfinite(hessian_SPP), axis=(-1, -2))[..., None, None]
  eig_SP, vectors_SPP = xp.linalg.eigh(xp.where(finite_S, hessian_SPP, xp.eye(p)))
  curvature_SP = xp.maximum(xp.abs(eig_SP), 1e-12 * xp.abs(eig_SP).max(axis=-1, keepdims=True))
  ok_S = finite_S & xp.all(curvature_SP > 0, axis=-1)[..., None, None]
  return Coordinates(x_SP, xp.where(ok_S, vectors_SPP / xp.sqrt(curvature_SP)[..., None, :],
                                    xp.eye(p)))
