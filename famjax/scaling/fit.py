"""Fitting a scaling law: the public API.

objective(params) = sum_i w_i * Huber_delta(log loss_i - law.log_loss(params, data)_i)
(Hoffmann et al. 2022; Epoch AI 2024), minimised by L-BFGS from a grid of starts in the lane
engine (lanes.py). Rows carry weights w_i, which is how bootstrap resamples (counts per row) reuse
the same compiled solver.

- `estimate`: the fitter as a JAX function (jit, vmap over studies, grad of any estimate with
  respect to the losses or row weights), with bootstrap intervals on request.
- `fit`: the same from the host, with progress bars and a FitResult holding every start.
- `solve`, `solve_batch`, `refine`, `restart`, `whiten`, `row_losses`, `lowest_grid_points`: the
  pieces, for callers who need them.

Shape letters: S starts, P parameters, R data rows, B bootstrap resamples, C screened starts per
resample, K finite-difference points.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import jaxopt
import numpy as np
from jax.flatten_util import ravel_pytree

from famjax.scaling import lanes as lanelib
from famjax.scaling.lanes import StopRules, objective, row_losses  # noqa: F401 (public)
from famjax.scaling.laws import Law, to_natural_name

DEFAULT_DELTA = 1e-3
N_POLISHED = 8  # best grid starts rerun in coordinates whitened at the best one
DEFAULT_LANES = 256  # vmapped solver lanes that a queue of starts streams through
FD_STEP = 1e-5  # central differences of the gradient, for `whiten`
REFINE_ROUNDS = 3  # rounds of re-whitening an unconverged start at its own point
RESTART_ROUNDS = 4  # rounds of fresh-memory continuation of the starts that still move
RESTART_RTOL = 1e-7  # a continuation "moves" when it lowers the objective by more than this of it
# per bootstrap refit of a small study: the grid points lowest in the resample's objective, each
# run to convergence. On a 20-row study 5 of 1000 resamples have a lower minimum than the refit
# from the optimum reaches, and which of the few lowest grid points reach it depends on the CPU's
# floating-point code path (2 starts missed 5 of them on one CPU, a different 5 under AVX2); with
# 6 or more, the same 2 of 1000 stay missed on both (docs/fitter.md)
SCREENED_STARTS = 8
# studies up to this size screen every refit (see bootstrap.bootstrap); at 60 rows screening
# lowered none of 1000 refits, and it would make a 90-row familial bootstrap 8x slower
SCREENED_MAX_ROWS = 50
SCREEN_BATCH = 512  # resamples screened at a time ([batch, S] objectives in memory)


def dense_solve(matvec, b, **_):
  """Solves matvec(x) = b exactly. The Hessians here are tiny (one row per parameter) and too
  ill-conditioned for jaxopt's default conjugate gradients, which return wrong implicit
  gradients."""
  flat_b, unravel = ravel_pytree(b)
  flat_matvec = lambda x: ravel_pytree(matvec(unravel(x)))[0]
  matrix = jax.vmap(flat_matvec, out_axes=1)(jnp.eye(flat_b.size, dtype=flat_b.dtype))
  return unravel(jnp.linalg.solve(matrix, flat_b))


def as_data(data: Mapping) -> dict[str, jnp.ndarray]:
  return {k: jnp.asarray(np.asarray(v, dtype=np.float64)) for k, v in data.items()}


class Coordinates(NamedTuple):
  """Solver coordinates z of parameters x (in a law's parameter order): x = origin + basis @ z."""
  origin: np.ndarray  # [P]
  basis: np.ndarray  # [P, P]

  @classmethod
  def identity(cls, n_params: int) -> "Coordinates":
    return cls(np.zeros(n_params), np.eye(n_params))

  def to_solver(self, x_SP: np.ndarray) -> np.ndarray:
    return np.linalg.solve(self.basis, (x_SP - self.origin).T).T

  def to_params(self, z_SP: np.ndarray) -> np.ndarray:
    return self.origin + z_SP @ self.basis.T


def _whitening(hessian_SPP: np.ndarray, x_SP: np.ndarray):
  """origin_SP, basis_SPP in which each Hessian is the identity (eigenvalues in absolute value,
  floored at 1e-12 of the largest); the law's own coordinates where a Hessian is not finite."""
  n, p = x_SP.shape
  hessian_SPP = (hessian_SPP + np.swapaxes(hessian_SPP, 1, 2)) / 2
  finite_S = np.all(np.isfinite(hessian_SPP), axis=(1, 2))
  eig_SP, vectors_SPP = np.linalg.eigh(np.where(finite_S[:, None, None], hessian_SPP, np.eye(p)))
  scale_S = np.abs(eig_SP).max(axis=1, keepdims=True)
  curvature_SP = np.maximum(np.abs(eig_SP), 1e-12 * scale_S)
  ok_S = finite_S & np.all(curvature_SP > 0, axis=1)
  basis_SPP = np.where(ok_S[:, None, None], vectors_SPP / np.sqrt(curvature_SP)[:, None, :],
                       np.eye(p))
  return x_SP, basis_SPP


def whiten(law: Law, names: tuple[str, ...], x_SP: np.ndarray, data: Mapping, weights_SR,
           fixed=None, *, delta: float = DEFAULT_DELTA, lanes: int = DEFAULT_LANES):
  """Coordinates centred on each point x_SP[s] in which the objective with row weights
  weights_SR[s] has the identity as its Hessian there: (origin_SP, basis_SPP).

  Near an optimum L-BFGS then starts with the right curvature: refits of Epoch's data converge
  in a few steps, where in the law's own coordinates (Hessian eigenvalues 1e-4..1e3) they take
  hundreds. The Hessians are central differences (FD_STEP) of gradients that the lane engine
  evaluates (maxiter 0), so they cost no compilation of their own.
  """
  x_SP = np.atleast_2d(np.asarray(x_SP, np.float64))
  n, p = x_SP.shape
  weights_SR = np.broadcast_to(np.asarray(weights_SR, np.float64), (n, data["loss"].shape[0]))
  offsets_KP = FD_STEP * np.concatenate([np.eye(p), -np.eye(p)])
  points = (x_SP[:, None, :] + offsets_KP[None]).reshape(n * 2 * p, p)
  with jax.enable_x64(True):
    out = lanelib.run(law, names, points, data, np.repeat(weights_SR, 2 * p, axis=0), fixed,
                      stop=StopRules(maxiter=0, maxls=1), delta=delta, lanes=lanes)
  grad_SKP = out.grad_SP.reshape(n, 2 * p, p)
  hessian_SPP = (grad_SKP[:, :p] - grad_SKP[:, p:]) / (2 * FD_STEP)
  return _whitening(hessian_SPP, x_SP)


def whitened(law: Law, params: Mapping[str, float], data: Mapping, *, delta: float = DEFAULT_DELTA,
             fixed: Mapping | None = None, lanes: int = DEFAULT_LANES,
             weights_R=None) -> Coordinates:
  """`whiten` at one point (the objective with row weights weights_R, all ones by default)."""
  names = tuple(params)
  data = as_data(data)
  weights_R = np.ones(data["loss"].shape[0]) if weights_R is None else weights_R
  origin_SP, basis_SPP = whiten(law, names, np.array([[params[k] for k in names]]), data,
                                weights_R[None], fixed, delta=delta, lanes=lanes)
  return Coordinates(origin_SP[0], basis_SPP[0])


def _solver(law: Law, delta: float, fixed, stop: StopRules) -> jaxopt.LBFGS:
  fun = functools.partial(objective, law=law, delta=delta, fixed=fixed)
  return jaxopt.LBFGS(fun=fun, maxiter=stop.maxiter, tol=stop.tol, maxls=stop.maxls,
                      implicit_diff=True, implicit_diff_solve=dense_solve)


def solve(law: Law, init: Mapping, data: Mapping, weights_R=None, *, delta: float = DEFAULT_DELTA,
          fixed: Mapping | None = None, stop: StopRules = StopRules()):
  """One L-BFGS run from `init`; returns (params, state). Pure: jit, vmap and grad (implicit
  differentiation with respect to the data, e.g. the observed losses) all work on it."""
  weights_R = jnp.ones_like(data["loss"]) if weights_R is None else weights_R
  init = {k: jnp.asarray(v, jnp.float64) for k, v in init.items()}
  return _solver(law, delta, fixed, stop).run(init, data, weights_R)


def solve_batch(law: Law, inits_S: Mapping, data: Mapping, weights_SR, fixed=None, *,
                coordinates: Coordinates | tuple | None = None, delta: float = DEFAULT_DELTA,
                stop: StopRules = StopRules(), lanes: int = DEFAULT_LANES,
                progress: bool = False, desc: str = "fit"):
  """Every start ({name: [S]}, row weights [S, R]) through the lane engine, in the given solver
  coordinates: the law's own by default, a Coordinates shared by every start, or per-start
  (origin_SP, basis_SPP). Returns numpy (params {name: [S]}, objective [S], converged [S])."""
  from tqdm.auto import tqdm
  names = tuple(inits_S)
  x_SP = np.stack([np.asarray(inits_S[k], np.float64) for k in names], -1)
  origin, basis = (None, None) if coordinates is None else tuple(coordinates)
  with jax.enable_x64(True), tqdm(total=len(x_SP), desc=desc, unit="start",
                                  disable=not progress) as bar:
    out = lanelib.run(law, names, x_SP, as_data(data), weights_SR, fixed, origin_SP=origin,
                      basis_SPP=basis, stop=stop, delta=delta, lanes=lanes, progress=bar)
  return ({k: out.x_SP[:, i] for i, k in enumerate(names)}, out.value_S,
          out.converged_S & np.isfinite(out.value_S))


def _copies(params_S, value_S, converged_S, weights_SR):
  """Float64 copies of a batch of starts (params, objective, converged) that the caller may
  update in place, and its row weights broadcast to [S, R]."""
  value_S = np.array(value_S)
  weights_SR = np.broadcast_to(np.asarray(weights_SR, np.float64),
                               (len(value_S), np.shape(weights_SR)[-1]))
  return ({k: np.array(v, np.float64) for k, v in params_S.items()}, value_S,
          np.array(converged_S), weights_SR)


def refine(law: Law, params_S: Mapping, value_S, converged_S, data: Mapping, weights_SR,
           fixed=None, *, delta: float = DEFAULT_DELTA, stop: StopRules = StopRules(),
           lanes: int = DEFAULT_LANES, rounds: int = REFINE_ROUNDS):
  """Continues every unconverged start from where it stopped, in coordinates whitened at its own
  point by its own objective (`whiten`), for up to `rounds` rounds, then `restart`s every start.
  Returns copies of (params, objective, converged); a continuation replaces a start only where it
  lowers the objective."""
  names = tuple(params_S)
  params_S, value_S, converged_S, weights_SR = _copies(params_S, value_S, converged_S, weights_SR)
  options = dict(delta=delta, stop=stop, lanes=lanes)
  for _ in range(rounds):
    todo = np.flatnonzero(~converged_S & np.isfinite(value_S))
    if not todo.size:
      break
    x_SP = np.stack([params_S[k][todo] for k in names], -1)
    coordinates = whiten(law, names, x_SP, data, weights_SR[todo], fixed, delta=delta,
                         lanes=lanes)
    new, value_T, converged_T = solve_batch(
        law, {k: params_S[k][todo] for k in names}, data, weights_SR[todo], fixed,
        coordinates=coordinates, **options)
    better = value_T <= value_S[todo]
    for k in names:
      params_S[k][todo[better]] = new[k][better]
    value_S[todo[better]] = value_T[better]
    converged_S[todo] = converged_T & better
  return restart(law, params_S, value_S, converged_S, data, weights_SR, fixed, **options)


def restart(law: Law, params_S: Mapping, value_S, converged_S, data: Mapping, weights_SR,
            fixed=None, *, delta: float = DEFAULT_DELTA, stop: StopRules = StopRules(),
            lanes: int = DEFAULT_LANES, rounds: int = RESTART_ROUNDS):
  """Continues every start from where it stopped with a fresh L-BFGS memory, in the law's own
  coordinates, and again for those that moved (lowered the objective by > RESTART_RTOL of it),
  up to `rounds` rounds. An L-BFGS can stall short of a minimum on the Huber objective's kinks
  with a curvature memory that no longer fits (stop.ftol then ends it as converged); a fresh
  start from the same point goes on. Returns copies of (params, objective, converged)."""
  names = tuple(params_S)
  params_S, value_S, converged_S, weights_SR = _copies(params_S, value_S, converged_S, weights_SR)
  todo = np.flatnonzero(np.isfinite(value_S))
  for _ in range(rounds):
    if not todo.size:
      break
    new, value_T, converged_T = solve_batch(
        law, {k: params_S[k][todo] for k in names}, data, weights_SR[todo], fixed,
        delta=delta, stop=stop, lanes=lanes)
    moved = value_T < value_S[todo] * (1 - RESTART_RTOL)
    todo = todo[moved]
    for k in names:
      params_S[k][todo] = new[k][moved]
    value_S[todo], converged_S[todo] = value_T[moved], converged_T[moved]
  return params_S, value_S, converged_S


@dataclasses.dataclass(frozen=True)
class FitResult:
  law: str
  params: dict[str, float]  # best converged start, log parameters (a, b, e, exponents)
  objective: float
  n_rows: int
  starts: dict[str, np.ndarray]  # every start's final parameters, [S] each
  start_objective: np.ndarray  # [S]
  start_converged: np.ndarray  # [S] bool: gradient <= tol, or a last step lowering the objective
  #                               by < ftol of it (and no failed line search)
  converged: bool = True  # whether the best start converged (else: the lowest finite one)
  fixed: dict[str, float] = dataclasses.field(default_factory=dict)


def fit(law: Law, data: Mapping, *, delta: float = DEFAULT_DELTA, grid: Mapping | None = None,
        fixed: Mapping | None = None, stop: StopRules = StopRules(), lanes: int = DEFAULT_LANES,
        progress: bool = False) -> FitResult:
  """Fits `law` from every grid start (the law's own grid by default) and keeps the best.

  Every start runs L-BFGS; the N_POLISHED lowest objectives are then rerun from where they
  stopped, in coordinates whitened at the lowest (see `whiten`), and those still unconverged are
  refined at their own points (`refine`). The best start is the lowest objective among converged
  starts (among all finite ones, with converged=False, if none converged).
  `fixed` holds parameters kept constant (e.g. a dense law under the branch law).
  """
  with jax.enable_x64(True):
    data = as_data(data)
    fixed = {k: jnp.float64(v) for k, v in (fixed or {}).items()}
    grid = {k: np.asarray(v, np.float64) for k, v in (grid or law.grid()).items()
            if k not in fixed}
    weights_SR = np.ones((1, data["loss"].shape[0]))
    options = dict(delta=delta, stop=stop, lanes=lanes)
    params_S, value_S, converged_S = solve_batch(law, grid, data, weights_SR, fixed,
                                                 progress=progress, **options)
    polished = np.argsort(np.where(np.isfinite(value_S), value_S, np.inf))[:N_POLISHED]
    around = {k: v[polished[0]] for k, v in params_S.items()}
    top = {k: v[polished] for k, v in params_S.items()}
    top, value_P, converged_P = solve_batch(
        law, top, data, weights_SR, fixed, progress=progress, desc="polish",
        coordinates=whitened(law, around, data, delta=delta, fixed=fixed, lanes=lanes), **options)
    top, value_P, converged_P = refine(law, top, value_P, converged_P, data, weights_SR, fixed,
                                       **options)
    for k in params_S:
      params_S[k][polished] = top[k]
    value_S[polished], converged_S[polished] = value_P, converged_P
    candidates = np.where(converged_S if converged_S.any() else np.isfinite(value_S),
                          value_S, np.inf)
    best = int(np.argmin(candidates))
    return FitResult(law=law.name, params={k: float(v[best]) for k, v in params_S.items()},
                     objective=float(value_S[best]), n_rows=int(data["loss"].shape[0]),
                     starts=params_S, start_objective=value_S, start_converged=converged_S,
                     converged=bool(converged_S[best]),
                     fixed={k: float(v) for k, v in fixed.items()})


# --- The fitter as a JAX function -----------------------------------------------------------


class Bootstrap(NamedTuple):
  samples: dict  # log parameters of every refit, [B] each (nan where a refit failed)
  converged: jax.Array  # [B] bool
  se: dict  # natural parameters (E, A, B, exponents): standard error over converged refits
  ci95: dict  # natural parameters: (low, high) percentile interval over converged refits


class Estimate(NamedTuple):
  params: dict  # log parameters (a, b, e, exponents): differentiable in the data and weights
  objective: jax.Array
  converged: jax.Array  # bool: the polished optimum's gradient is below stop.tol
  bootstrap: Bootstrap | None


def _check_float64(data: Mapping) -> None:
  dtype = jnp.result_type(*jax.tree.leaves(data))
  if dtype != jnp.float64:
    raise TypeError(
        f"famjax fits run in float64 but the data are {dtype}: 64-bit mode is off. Call it "
        "inside `with jax.enable_x64(True):` (around your jit, vmap or grad too) or set "
        "jax.config.update('jax_enable_x64', True) at start-up")


def _hessian_whitening(law, names, x_P, data, weights_R, fixed, delta):
  """(origin, basis) making the objective's Hessian at x_P the identity, in JAX."""
  fun = lambda x: objective(dict(zip(names, x)), data, weights_R, law=law, delta=delta,
                            fixed=fixed)
  hessian = jax.hessian(fun)(x_P)
  hessian = (hessian + hessian.T) / 2
  eig, vectors = jnp.linalg.eigh(hessian)
  curvature = jnp.maximum(jnp.abs(eig), 1e-12 * jnp.abs(eig).max())
  ok = jnp.all(jnp.isfinite(hessian)) & jnp.all(curvature > 0)
  return x_P, jnp.where(ok, vectors / jnp.sqrt(curvature), jnp.eye(x_P.size))


def lowest_grid_points(law: Law, names: tuple[str, ...], grid_SP, data: Mapping, weights_BR,
                       fixed=None, *, delta: float = DEFAULT_DELTA, k: int = SCREENED_STARTS):
  """[B, C] indices of the k points of grid_SP with the lowest objective for each row weighting:
  one [B, R] x [R, S] product, since the objective is linear in the row weights. Pure JAX."""
  rows = lambda x_P: row_losses(dict(zip(names, x_P)), data, law=law, delta=delta, fixed=fixed)
  losses_SR = jax.vmap(rows)(jnp.asarray(grid_SP))
  finite_S = jnp.all(jnp.isfinite(losses_SR), axis=1)
  losses_SR = jnp.where(finite_S[:, None], losses_SR, 0.0)
  lowest = lambda weights_R: jax.lax.top_k(
      jnp.where(finite_S, -(losses_SR @ weights_R), -jnp.inf), min(k, len(grid_SP)))[1]
  return jax.lax.map(lowest, jnp.asarray(weights_BR), batch_size=SCREEN_BATCH)


def _resample_counts(key, n_rows: int, n: int, groups) -> jax.Array:
  """[n, R] row multiplicities: rows drawn with replacement, or whole groups (integer labels
  0..G-1, concrete) if given."""
  if groups is None:
    draws = jax.random.randint(key, (n, n_rows), 0, n_rows)
    return jax.nn.one_hot(draws, n_rows, dtype=jnp.float64).sum(axis=1)
  groups = np.asarray(groups)
  n_groups = int(groups.max()) + 1
  draws = jax.random.randint(key, (n, n_groups), 0, n_groups)
  return jax.nn.one_hot(draws, n_groups, dtype=jnp.float64).sum(axis=1)[:, groups]


def estimate(law: Law, data: Mapping, *, weights=None, grid: Mapping | None = None,
             fixed: Mapping | None = None, delta: float = DEFAULT_DELTA,
             stop: StopRules = StopRules(), lanes: int = 64, n_bootstrap: int = 0, key=None,
             groups: Sequence[int] | None = None) -> Estimate:
  """Fits `law` to data columns ({"N", "D", ..., "loss"}: [R] float64 arrays) as a JAX function.

  Multi-start L-BFGS from `grid` (the law's own grid by default; concrete), the best start
  polished in coordinates whitened by the Hessian there, then one jaxopt.LBFGS run whose result
  is differentiable, by implicit differentiation, in the losses and the row `weights`. Works
  inside jax.jit (one compilation per data shape), jax.vmap (over studies of the same shape) and
  jax.grad. With n_bootstrap > 0 (and a PRNG `key`), refits of resampled rows (or of whole
  `groups`, integer labels 0..G-1) give standard errors and 95% percentile intervals. In a study
  of up to SCREENED_MAX_ROWS rows every refit also runs from the SCREENED_STARTS grid points
  lowest in its resample's objective, and the lowest converged end is kept; a refit still
  unconverged after re-whitening at its own point and a `restart` is excluded (nan in
  `samples`). The host's `bootstrap.bootstrap` adds more retries (docs/fitter.md).

  Needs 64-bit mode (jax.enable_x64): in float32 the Huber objective's kinks at delta = 1e-3 are
  lost in rounding, so a float32 call is a TypeError, not a silently wrong fit.
  """
  _check_float64(data)
  data = dict(data)
  n_rows = data["loss"].shape[0]
  weights = jnp.ones(n_rows) if weights is None else jnp.asarray(weights)
  fixed = {k: jnp.asarray(v, jnp.float64) for k, v in (fixed or {}).items()}
  grid = {k: np.asarray(v, np.float64) for k, v in (grid or law.grid()).items() if k not in fixed}
  names = tuple(grid)
  options = dict(names=names, delta=delta, lanes=lanes)
  const = jax.lax.stop_gradient
  frozen = {k: const(v) for k, v in data.items()}
  x_SP = np.stack([grid[k] for k in names], -1)
  starts = lanelib.solve(law, lanelib.queue(x_SP, const(weights)[None]), frozen, fixed, stop,
                         **options)
  value_S = jnp.where(starts.converged_S & jnp.isfinite(starts.value_S), starts.value_S, jnp.inf)
  value_S = jnp.where(jnp.isfinite(value_S).any(), value_S,
                      jnp.where(jnp.isfinite(starts.value_S), starts.value_S, jnp.inf))
  best_P = starts.x_SP[jnp.argmin(value_S)]
  origin_P, basis_PP = _hessian_whitening(law, names, best_P, frozen, const(weights), fixed, delta)
  polished = lanelib.solve(law, lanelib.queue(best_P[None], const(weights)[None], origin_P[None],
                                              basis_PP[None]), frozen, fixed, stop, **options)
  init = dict(zip(names, polished.x_SP[0]))
  params, state = solve(law, init, data, weights, delta=delta, fixed=fixed, stop=stop)
  boot = None
  if n_bootstrap:
    if key is None:
      raise ValueError("estimate(n_bootstrap > 0) needs a PRNG key, e.g. jax.random.key(0)")
    boot = _bootstrap(law, names, const(jnp.stack([params[k] for k in names])),
                      np.unique(x_SP, axis=0), frozen, const(weights), fixed, delta, stop, lanes,
                      n_bootstrap, key, groups)
  return Estimate(params, state.value, state.error <= stop.tol, boot)


def _refits(law, names, x_BP, counts_BR, coordinates, data, fixed, delta, stop, lanes):
  """Refits from x_BP in the given coordinates, then one more round for each, whitened at its own
  point by its own objective (converged ones stop at once), then one with a fresh L-BFGS memory
  in the law's own coordinates (see `restart`). Returns (x_BP, value_B, converged_B)."""
  options = dict(names=names, delta=delta, lanes=lanes)
  first = lanelib.solve(law, lanelib.queue(x_BP, counts_BR, *coordinates), data, fixed, stop,
                        **options)
  whiten_B = jax.vmap(lambda x, w: _hessian_whitening(law, names, x, data, w, fixed, delta))
  second = lanelib.solve(law, lanelib.queue(first.x_SP, counts_BR, *whiten_B(first.x_SP,
                                                                              counts_BR)),
                         data, fixed, stop, **options)
  better_B = second.value_S <= first.value_S
  x_BP = jnp.where(better_B[:, None], second.x_SP, first.x_SP)
  value_B = jnp.where(better_B, second.value_S, first.value_S)
  converged_B = jnp.where(better_B, second.converged_S, first.converged_S)
  third = lanelib.solve(law, lanelib.queue(x_BP, counts_BR), data, fixed, stop, **options)
  moved_B = third.value_S < value_B * (1 - RESTART_RTOL)
  return (jnp.where(moved_B[:, None], third.x_SP, x_BP), jnp.where(moved_B, third.value_S, value_B),
          jnp.where(moved_B, third.converged_S, converged_B))


def _bootstrap(law, names, x_P, grid_SP, data, weights, fixed, delta, stop, lanes, n, key,
               groups):
  """Refits from the optimum x_P, whitened there; in studies of up to SCREENED_MAX_ROWS rows,
  also from each resample's SCREENED_STARTS lowest grid points, the lowest converged end kept."""
  counts_BR = _resample_counts(key, weights.shape[0], n, groups) * weights
  refit = functools.partial(_refits, law, names, data=data, fixed=fixed, delta=delta, stop=stop,
                            lanes=lanes)
  x_BP, value_B, converged_B = refit(jnp.broadcast_to(x_P, (n, x_P.size)), counts_BR,
                                     _hessian_whitening(law, names, x_P, data, weights, fixed,
                                                        delta))
  if weights.shape[0] <= SCREENED_MAX_ROWS:
    top_BC = lowest_grid_points(law, names, grid_SP, data, counts_BR, fixed, delta=delta)
    c = top_BC.shape[1]
    x_SP, value_S, converged_S = refit(jnp.asarray(grid_SP)[top_BC.reshape(-1)],
                                       jnp.repeat(counts_BR, c, axis=0), ())
    value_BC = jnp.where(converged_S, value_S, jnp.inf).reshape(n, c)
    best_B = jnp.arange(n) * c + jnp.argmin(value_BC, axis=1)
    lower_B = converged_S[best_B] & (value_S[best_B] < jnp.where(converged_B, value_B, jnp.inf))
    x_BP = jnp.where(lower_B[:, None], x_SP[best_B], x_BP)
    converged_B = converged_B | lower_B
  x_BP = jnp.where(converged_B[:, None], x_BP, jnp.nan)
  samples = dict(zip(names, x_BP.T))
  natural = {to_natural_name(k): jnp.exp(v) if to_natural_name(k) != k else v
             for k, v in samples.items()}
  se = {k: jnp.nanstd(v, ddof=1) for k, v in natural.items()}
  ci = {k: (jnp.nanpercentile(v, 2.5), jnp.nanpercentile(v, 97.5)) for k, v in natural.items()}
  return Bootstrap(samples, converged_B, se, ci)
