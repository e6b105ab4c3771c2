"""Fitting a scaling law: the public API.

objective(params) = sum_i w_i * Huber_delta(log loss_i - law.log_loss(params, data)_i)
(Hoffmann et al. 2022; Epoch AI 2024), minimised by L-BFGS from a grid of starts in the lane
engine (lanes.py), through the stages of stages.py. Rows carry weights w_i, which is how
bootstrap resamples (counts per row) reuse the same compiled solver.

- `estimate`: the fitter as a JAX function (jit, vmap over studies, grad of any estimate with
  respect to the losses or row weights), with bootstrap intervals on request.
- `fit`: the same stages driven from the host, with progress bars, more retry rounds and a
  FitResult holding every start.
- `solve`, `solve_batch`, `refine`, `restart`, `whitened`, `lowest_grid_points`: the pieces, for
  callers who need them; `Problem` and `Solver` are what they take.

Shape letters: S starts, P parameters, R data rows, B bootstrap resamples.
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

from famjax.scaling import stages
from famjax.scaling.lanes import Outcome
from famjax.scaling.laws import Law
from famjax.scaling.problem import (  # noqa: F401 (public)
  DEFAULT_DELTA,
  DEFAULT_LANES,
  Coordinates,
  Problem,
  Solver,
  StopRules,
  as_data,
  objective,
  problem,
  row_losses,
)
from famjax.scaling.stages import SCREENED_MAX_ROWS, SCREENED_STARTS, lowest_grid_points  # noqa: F401 (public)

N_POLISHED = 8  # best grid starts rerun in coordinates whitened at the best one


def dense_solve(matvec, b, **_):
  """Solves matvec(x) = b exactly. The Hessians here are tiny (one row per parameter) and too
  ill-conditioned for jaxopt's default conjugate gradients, which return wrong implicit
  gradients."""
  flat_b, unravel = ravel_pytree(b)
  flat_matvec = lambda x: ravel_pytree(matvec(unravel(x)))[0]
  matrix = jax.vmap(flat_matvec, out_axes=1)(jnp.eye(flat_b.size, dtype=flat_b.dtype))
  return unravel(jnp.linalg.solve(matrix, flat_b))


def _grid_points(grid: Mapping, names: tuple[str, ...]) -> np.ndarray:
  return np.stack([np.asarray(grid[k], np.float64) for k in names], -1)


def whitened(law: Law, params: Mapping[str, float], data: Mapping, *, delta: float = DEFAULT_DELTA,
             fixed: Mapping | None = None, solver: Solver = Solver(),
             weights_R=None) -> Coordinates:
  """Coordinates centred on `params` in which the objective (row weights weights_R, all ones by
  default) has the identity as its Hessian there (stages.whiten, from the host)."""
  with jax.enable_x64(True):
    p = problem(law, data, params, fixed=fixed, delta=delta)
    weights_R = np.ones(p.n_rows) if weights_R is None else np.asarray(weights_R, np.float64)
    at = stages.whiten(p, np.array([[params[k] for k in p.names]]), weights_R[None], solver,
                       stages.host())
    return Coordinates(at.origin[0], at.basis[0])


def solve(law: Law, init: Mapping, data: Mapping, weights_R=None, *, delta: float = DEFAULT_DELTA,
          fixed: Mapping | None = None, stop: StopRules = StopRules()):
  """One L-BFGS run from `init`; returns (params, state). Pure: jit, vmap and grad (implicit
  differentiation with respect to the data, e.g. the observed losses) all work on it."""
  weights_R = jnp.ones_like(data["loss"]) if weights_R is None else weights_R
  init = {k: jnp.asarray(v, jnp.float64) for k, v in init.items()}
  fun = functools.partial(objective, law=law, delta=delta, fixed=fixed)
  solver = jaxopt.LBFGS(fun=fun, maxiter=stop.maxiter, tol=stop.tol, maxls=stop.maxls,
                        implicit_diff=True, implicit_diff_solve=dense_solve)
  return solver.run(init, data, weights_R)


def solve_batch(p: Problem, inits_S: Mapping, weights_SR, solver: Solver = Solver(), *,
                coordinates: Coordinates | None = None, desc: str | None = None) -> Outcome:
  """Every start ({name: [S]}, row weights [S, R]) through the lane engine from the host, in the
  given solver coordinates (the law's own by default; one for every start or one each), with a
  progress bar named `desc` if given. Returns numpy arrays."""
  with jax.enable_x64(True):
    return stages.descend(p, _grid_points(inits_S, p.names), weights_SR, solver,
                          stages.host(desc), coordinates)


def refine(p: Problem, ends: Outcome, weights_SR, solver: Solver = Solver()) -> Outcome:
  """stages.refine then stages.restart from the host (REFINE_ROUNDS and RESTART_ROUNDS)."""
  with jax.enable_x64(True):
    return stages.settle(p, ends, weights_SR, solver, stages.host())


def restart(p: Problem, ends: Outcome, weights_SR, solver: Solver = Solver()) -> Outcome:
  """stages.restart from the host."""
  with jax.enable_x64(True):
    return stages.restart(p, ends, weights_SR, solver, stages.host())


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
  delta: float = DEFAULT_DELTA  # the Huber delta it was fitted with


def fit(law: Law, data: Mapping, *, delta: float = DEFAULT_DELTA, grid: Mapping | None = None,
        fixed: Mapping | None = None, solver: Solver = Solver(),
        progress: bool = False) -> FitResult:
  """Fits `law` from every grid start (the law's own grid by default) and keeps the best.

  Every start runs L-BFGS; the N_POLISHED lowest objectives are then rerun from where they
  stopped, in coordinates whitened at the lowest (stages.polish), and settled (stages.refine,
  stages.restart). The best start is the lowest objective among converged starts (among all
  finite ones, with converged=False, if none converged).
  `fixed` holds parameters kept constant (e.g. a dense law under the branch law).
  """
  grid = dict(grid or law.grid())
  with jax.enable_x64(True):
    p = problem(law, data, grid, fixed=fixed, delta=delta)
    weights_R = np.ones(p.n_rows)
    starts = stages.descend(p, _grid_points(grid, p.names), weights_R[None], solver,
                            stages.host("fit" if progress else None))
    polished = np.argsort(np.where(np.isfinite(starts.value_S), starts.value_S, np.inf))
    polished = polished[:N_POLISHED]
    top = stages.polish(p, starts.x_SP[polished], starts.x_SP[polished[0]], weights_R, solver,
                        stages.host("polish" if progress else None))
    top = stages.settle(p, top, weights_R[None], solver, stages.host())
    ends = starts.put(polished, top)
  candidates = np.where(ends.converged_S if ends.converged_S.any() else np.isfinite(ends.value_S),
                        ends.value_S, np.inf)
  best = int(np.argmin(candidates))
  return FitResult(law=law.name, params={k: float(v) for k, v in zip(p.names, ends.x_SP[best])},
                   objective=float(ends.value_S[best]), n_rows=p.n_rows,
                   starts=ends.params(p.names), start_objective=ends.value_S,
                   start_converged=ends.converged_S, converged=bool(ends.converged_S[best]),
                   fixed={k: float(v) for k, v in p.fixed.items()}, delta=delta)


# --- The fitter as a JAX function -----------------------------------------------------------


class Resampling(NamedTuple):
  """Bootstrap refits for `estimate`: n resamples drawn with a PRNG key, of rows or of whole
  groups (integer labels 0..n_groups-1, one per row, concrete)."""
  n: int
  key: jax.Array
  groups: Sequence[int] | None = None


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


def estimate(law: Law, data: Mapping, *, weights=None, grid: Mapping | None = None,
             fixed: Mapping | None = None, delta: float = DEFAULT_DELTA,
             solver: Solver = Solver(lanes=64),
             resampling: Resampling | None = None) -> Estimate:
  """Fits `law` to data columns ({"N", "D", ..., "loss"}: [R] float64 arrays) as a JAX function.

  Multi-start L-BFGS from `grid` (the law's own grid by default; concrete), the best start
  polished in coordinates whitened by the Hessian there, then one jaxopt.LBFGS run whose result
  is differentiable, by implicit differentiation, in the losses and the row `weights`. Works
  inside jax.jit (one compilation per data shape), jax.vmap (over studies of the same shape) and
  jax.grad. With a `resampling` (n refits, a PRNG key, optional groups), refits of resampled
  rows or groups give standard errors and 95% percentile intervals. In a study of up to
  SCREENED_MAX_ROWS rows every refit also runs from the SCREENED_STARTS grid points lowest in its
  resample's objective, and the lowest converged end is kept; a refit still unconverged after
  re-whitening at its own point and a restart is excluded (nan in `samples`). The host's
  `bootstrap.bootstrap` adds more retries (docs/fitter.md).

  Needs 64-bit mode (jax.enable_x64): in float32 the Huber objective's kinks at delta = 1e-3 are
  lost in rounding, so a float32 call is a TypeError, not a silently wrong fit.
  """
  _check_float64(data)
  grid = dict(grid or law.grid())
  fixed = {k: jnp.asarray(v, jnp.float64) for k, v in (fixed or {}).items()}
  names = tuple(k for k in grid if k not in fixed)
  const = jax.lax.stop_gradient
  frozen = Problem(law, names, {k: const(v) for k, v in data.items()}, fixed, delta)
  weights = jnp.ones(frozen.n_rows) if weights is None else jnp.asarray(weights)
  x_SP = _grid_points(grid, names)
  starts = stages.descend(frozen, x_SP, const(weights)[None], solver, stages.TRACED)
  value_S = jnp.where(starts.converged_S, starts.value_S, jnp.inf)
  value_S = jnp.where(jnp.isfinite(value_S).any(), value_S,
                      jnp.where(jnp.isfinite(starts.value_S), starts.value_S, jnp.inf))
  best_P = starts.x_SP[jnp.argmin(value_S)]
  polished = stages.polish(frozen, best_P[None], best_P, const(weights), solver, stages.TRACED)
  params, state = solve(law, frozen.params(polished.x_SP[0]), dict(data), weights, delta=delta,
                        fixed=fixed, stop=solver.stop)
  boot = None
  if resampling is not None:
    x_P = const(jnp.stack([params[k] for k in names]))
    boot = _bootstrap(frozen, x_P, np.unique(x_SP, axis=0), const(weights), solver, resampling)
  return Estimate(params, state.value, state.error <= solver.stop.tol, boot)


def _bootstrap(p: Problem, x_P, grid_SP, weights_R, solver: Solver,
               resampling: Resampling) -> Bootstrap:
  """Refits from the optimum x_P, whitened there; in studies of up to SCREENED_MAX_ROWS rows,
  also from each resample's SCREENED_STARTS lowest grid points, the lowest converged end kept."""
  n = resampling.n
  counts_BR = stages.resample_counts(resampling.key, p.n_rows, n, resampling.groups) * weights_R
  at = stages.whiten(p, x_P[None], weights_R[None], solver, stages.TRACED)
  ends = stages.refits(p, jnp.broadcast_to(x_P, (n, x_P.size)), counts_BR, solver,
                       stages.TRACED, Coordinates(at.origin[0], at.basis[0]))
  if p.n_rows <= stages.SCREENED_MAX_ROWS:
    top_BC = stages.lowest_grid_points(p, grid_SP, counts_BR)
    found = stages.screened(p, grid_SP, counts_BR, top_BC, solver, stages.TRACED)
    ends = stages.lower_converged(ends, found)
  x_BP = jnp.where(ends.converged_S[:, None], ends.x_SP, jnp.nan)
  se, ci95 = stages.interval_summary(stages.natural_samples(p, ends))
  return Bootstrap(p.params(x_BP.T), ends.converged_S, se, ci95)
