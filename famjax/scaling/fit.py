"""Huber-in-log-space fits of a law with jaxopt L-BFGS from a grid of starts, all in one jitted vmap.

objective(params) = sum_i w_i * Huber_delta(log loss_i - law.log_loss(params, data)_i)
(Hoffmann et al. 2022; Epoch AI 2024). Rows carry weights w_i, which is how bootstrap resamples
(counts per row) reuse the same compiled solver.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import jaxopt
from jax.flatten_util import ravel_pytree
import numpy as np
import optax

from famjax.scaling.laws import Law

DEFAULT_DELTA = 1e-3
DEFAULT_MAXITER = 1000
DEFAULT_TOL = 1e-9  # on the gradient norm; objectives here are ~1e-3
# ... or a step that lowers the objective by less than this fraction: Huber kinks can keep the
# gradient norm from ever reaching tol (scipy's L-BFGS-B stops on the same kind of test).
DEFAULT_FTOL = 1e-10
DEFAULT_MAXLS = 20  # line-search trials per step, as scipy's L-BFGS-B (jaxopt's default is 30)
DEFAULT_CHUNK = 500  # starts per vmapped solve: a chunk runs until its slowest start finishes


def objective(params, data, weights_R, *, law: Law, delta: float, fixed: Mapping | None = None):
  residual_R = jnp.log(data["loss"]) - law.log_loss({**(fixed or {}), **params}, data)
  return jnp.sum(weights_R * optax.losses.huber_loss(residual_R, delta=delta))


def dense_solve(matvec, b, **_):
  """Solves matvec(x) = b exactly. The Hessians here are tiny (one row per parameter) and too
  ill-conditioned for jaxopt's default conjugate gradients, which return wrong implicit gradients."""
  flat_b, unravel = ravel_pytree(b)
  flat_matvec = lambda x: ravel_pytree(matvec(unravel(x)))[0]
  matrix = jax.vmap(flat_matvec, out_axes=1)(jnp.eye(flat_b.size, dtype=flat_b.dtype))
  return unravel(jnp.linalg.solve(matrix, flat_b))


def _solver(law: Law, delta: float, fixed, maxiter: int, tol: float) -> jaxopt.LBFGS:
  fun = functools.partial(objective, law=law, delta=delta, fixed=fixed)
  return jaxopt.LBFGS(fun=fun, maxiter=maxiter, tol=tol, maxls=DEFAULT_MAXLS,
                      implicit_diff=True, implicit_diff_solve=dense_solve)


def solve(law: Law, init: Mapping, data: Mapping, weights_R=None, *, delta: float = DEFAULT_DELTA,
          fixed: Mapping | None = None, maxiter: int = DEFAULT_MAXITER, tol: float = DEFAULT_TOL):
  """One L-BFGS run from `init`; returns (params, state). Pure: jit, vmap and grad (implicit
  differentiation with respect to the data, e.g. the observed losses) all work on it."""
  weights_R = jnp.ones_like(data["loss"]) if weights_R is None else weights_R
  init = {k: jnp.asarray(v, jnp.float64) for k, v in init.items()}
  return _solver(law, delta, fixed, maxiter, tol).run(init, data, weights_R)


@functools.partial(jax.jit, static_argnames=("law", "delta", "maxiter", "tol", "ftol"))
def solve_many(law: Law, inits_S: Mapping, data: Mapping, weights_SR, fixed=None, *,
               delta: float = DEFAULT_DELTA, maxiter: int = DEFAULT_MAXITER,
               tol: float = DEFAULT_TOL, ftol: float = DEFAULT_FTOL):
  """S independent L-BFGS runs in one vmap: start s from inits_S[.][s] with row weights
  weights_SR[s]. Returns (params {name: [S]}, objective [S], converged [S], iterations [S]);
  a lane has converged when its gradient norm is <= tol or a step lowered its objective by less
  than ftol (relative).

  Under vmap every lane steps until the last one is done, and a finished lane's line search can
  spin to its limit on every step. So a lane that has converged (or whose line search failed) is
  frozen and its objective weights zeroed: its later steps cost one evaluation and change nothing.
  """
  solver = _solver(law, delta, fixed, maxiter, tol)
  inits_S = {k: jnp.asarray(v, jnp.float64) for k, v in inits_S.items()}
  update = jax.vmap(solver.update, in_axes=(0, 0, None, 0))
  state = jax.vmap(solver.init_state, in_axes=(0, None, 0))(inits_S, data, weights_SR)
  n = weights_SR.shape[0]
  converged_S = state.error <= tol
  carry = (inits_S, state, ~converged_S, state.value, converged_S, jnp.zeros(n, jnp.int32), 0)

  def step(carry):
    params, state, active_S, value_S, converged_S, iters_S, it = carry
    live_SR = weights_SR * active_S[:, None]
    new_params, state = update(params, state, data, live_SR)
    params = jax.tree.map(lambda new, old: jnp.where(active_S, new, old), new_params, params)
    stalled_S = (value_S - state.value) <= ftol * jnp.abs(value_S)
    converged_S = converged_S | (active_S & ((state.error <= tol) | stalled_S))
    value_S = jnp.where(active_S, state.value, value_S)
    iters_S = iters_S + active_S
    # A failed line search leaves a lane stuck: it stops there, counted as not converged.
    active_S = (active_S & ~converged_S & jnp.isfinite(state.value) & ~state.failed_linesearch)
    return params, state, active_S, value_S, converged_S, iters_S, it + 1

  def keep_going(carry):
    return jnp.any(carry[2]) & (carry[-1] < maxiter)

  params, _, _, value_S, converged_S, iters_S, _ = jax.lax.while_loop(keep_going, step, carry)
  return params, value_S, converged_S, iters_S


def solve_chunked(law: Law, inits_S: Mapping, data: Mapping, weights_SR, fixed=None, *,
                  delta: float = DEFAULT_DELTA, maxiter: int = DEFAULT_MAXITER,
                  tol: float = DEFAULT_TOL, chunk: int = DEFAULT_CHUNK, progress: bool = False,
                  desc: str = "fit"):
  """solve_many over fixed-size chunks (the last one padded), so one compilation serves any S.

  Returns numpy (params {name: [S]}, objective [S], converged [S]).
  """
  from tqdm.auto import tqdm
  inits_S = {k: np.asarray(v, np.float64) for k, v in inits_S.items()}
  weights_SR = np.asarray(weights_SR, np.float64)
  n = weights_SR.shape[0]
  size = min(chunk, n)
  pad = lambda x, lo: np.concatenate([x[lo:lo + size], np.repeat(x[-1:], max(0, lo + size - n), 0)])
  pieces = []
  for lo in tqdm(range(0, n, size), desc=desc, unit="chunk", disable=not progress):
    out = solve_many(law, {k: pad(v, lo) for k, v in inits_S.items()}, data, pad(weights_SR, lo),
                     fixed, delta=delta, maxiter=maxiter, tol=tol)
    pieces.append(jax.tree.map(lambda x: np.asarray(x)[: min(size, n - lo)], out[:3]))
  params, value, error = (jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
                          for parts in zip(*pieces))
  return params, value, error


@dataclasses.dataclass(frozen=True)
class FitResult:
  law: str
  params: dict[str, float]  # best converged start, log parameters (a, b, e, exponents)
  objective: float
  n_rows: int
  starts: dict[str, np.ndarray]  # every start's final parameters, [S] each
  start_objective: np.ndarray  # [S]
  start_converged: np.ndarray  # [S] bool: gradient norm <= tol or objective stalled (ftol)
  fixed: dict[str, float] = dataclasses.field(default_factory=dict)


def as_data(data: Mapping) -> dict[str, jnp.ndarray]:
  return {k: jnp.asarray(np.asarray(v, dtype=np.float64)) for k, v in data.items()}


def fit(law: Law, data: Mapping, *, delta: float = DEFAULT_DELTA, grid: Mapping | None = None,
        fixed: Mapping | None = None, maxiter: int = DEFAULT_MAXITER, tol: float = DEFAULT_TOL,
        chunk: int = DEFAULT_CHUNK, progress: bool = False) -> FitResult:
  """Fits `law` from every grid start (the law's own grid by default) and keeps the best.

  The best start is the lowest objective among converged starts (among all finite ones if none
  converged). `fixed` holds parameters kept constant (e.g. a dense law under the branch law).
  """
  with jax.enable_x64(True):
    data = as_data(data)
    fixed = {k: jnp.float64(v) for k, v in (fixed or {}).items()}
    grid = {k: np.asarray(v, np.float64) for k, v in (grid or law.grid()).items()
            if k not in fixed}
    n_starts = len(next(iter(grid.values())))
    weights_SR = np.ones((n_starts, data["loss"].shape[0]))
    params_S, value_S, converged_S = solve_chunked(law, grid, data, weights_SR, fixed, delta=delta,
                                               maxiter=maxiter, tol=tol, chunk=chunk,
                                               progress=progress)
    converged_S = converged_S & np.isfinite(value_S)
    candidates = np.where(converged_S if converged_S.any() else np.isfinite(value_S),
                          value_S, np.inf)
    best = int(np.argmin(candidates))
    starts = dict(params_S)
    return FitResult(law=law.name, params={k: float(v[best]) for k, v in starts.items()},
                     objective=float(value_S[best]), n_rows=int(data["loss"].shape[0]),
                     starts=starts, start_objective=value_S, start_converged=converged_S,
                     fixed={k: float(v) for k, v in fixed.items()})
