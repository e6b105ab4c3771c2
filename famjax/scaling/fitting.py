"""Fitting a scaling law: the public API.

objective(params) = sum_i w_i * Huber_delta(log loss_i - law.log_loss(params, data)_i)
(Hoffmann et al. 2022; Epoch AI 2024), minimised by L-BFGS from a lattice of starts in the lane
engine (lanes.py), through the stages of fit_stages.py. Rows carry weights w_i, which is how
bootstrap resamples (counts per row) reuse the same compiled solver.

A `Problem` (`Problem.of(law, data, fixed=..., delta=...)`) says what is fitted, a `Solver` how:

- `fit(problem, solver)`: from the host, with progress bars; a FitResult holding every start.
- `estimate(problem, solver)`: the same stages as a JAX function (jit, vmap over studies, grad
  of any estimate with respect to the losses or row weights); an Estimate.
- `bootstrap.bootstrap(fit_or_estimate, resampling, solver)`: refits of resamples of either.
- `solve`: one differentiable jaxopt L-BFGS run, for callers who need the piece.

Shape letters: S starts, P parameters, R data rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import jaxopt
import numpy as np
from jax.flatten_util import ravel_pytree

from famjax.scaling.laws import Law
from famjax.scaling.problem_and_solver import (  # noqa: F401 (public)
  DEFAULT_DELTA,
  DEFAULT_LANES,
  Problem,
  Solver,
  StopRules,
  as_data,
  objective,
  row_losses,
  start_points,
)
from famjax.scaling.resampling import Resampling  # noqa: F401 (public)
from famjax.scaling.solver import fit_stages


def dense_solve(matvec, b, **_):
  """Solves matvec(x) = b exactly. The Hessians here are tiny (one row per parameter) and too
  ill-conditioned for jaxopt's default conjugate gradients, which return wrong implicit
  gradients."""
  flat_b, unravel = ravel_pytree(b)
  flat_matvec = lambda x: ravel_pytree(matvec(unravel(x)))[0]
  matrix = jax.vmap(flat_matvec, out_axes=1)(jnp.eye(flat_b.size, dtype=flat_b.dtype))
  return unravel(jnp.linalg.solve(matrix, flat_b))


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


@dataclasses.dataclass(frozen=True)
class FitResult:
  problem: Problem  # what was fitted: law, free parameters, data, fixed ones, Huber delta
  params: dict[str, float]  # best converged start, log parameters (a, b, e, exponents)
  objective: float
  starts: dict[str, np.ndarray]  # every start's final parameters, [S] each
  start_objective: np.ndarray  # [S]
  start_converged: np.ndarray  # [S] bool: gradient <= tol, or a last step lowering the objective
  #                               by < ftol of it (and no failed line search)
  converged: bool = True  # whether the best start converged (else: the lowest finite one)

  @property
  def law(self) -> Law:
    return self.problem.law

  @property
  def n_rows(self) -> int:
    return self.problem.n_rows


def fit(problem: Problem, solver: Solver = Solver(), *, starts: Mapping | None = None,
        weights=None, progress: bool = False) -> FitResult:
  """Fits the problem from every start (the law's own starts by default) and keeps the best
  (fit_stages.best_of_starts: every start, the lowest polished and settled). `weights` ([R], default
  ones) scale each row's term: 0 leaves a row out without a new compiled program."""
  weights_R = np.ones(problem.n_rows) if weights is None else np.asarray(weights, np.float64)
  with jax.enable_x64(True):
    ends, best = fit_stages.best_of_starts(problem, start_points(problem, starts), weights_R,
                                       solver, fit_stages.HOST, progress)
  best = int(best)
  return FitResult(problem=problem, params=dict(zip(problem.names, map(float, ends.x_SP[best]))),
                   objective=float(ends.value_S[best]), starts=ends.params(problem.names),
                   start_objective=ends.value_S, start_converged=ends.converged_S,
                   converged=bool(ends.converged_S[best]))


# --- The fitter as a JAX function -----------------------------------------------------------


class Estimate(NamedTuple):
  problem: Problem  # what was fitted (its data with their gradient stopped)
  params: dict  # log parameters (a, b, e, exponents): differentiable in the data and weights
  objective: jax.Array
  converged: jax.Array  # bool: the polished optimum's gradient is below stop.tol
  weights_R: jax.Array  # the row weights it was fitted with


def _check_float64(data: Mapping) -> None:
  dtype = jnp.result_type(*jax.tree.leaves(data))
  if dtype != jnp.float64:
    raise TypeError(
        f"famjax fits run in float64 but the data are {dtype}: 64-bit mode is off. Call it "
        "inside `with jax.enable_x64(True):` (around your jit, vmap or grad too) or set "
        "jax.config.update('jax_enable_x64', True) at start-up")


def estimate(problem: Problem, solver: Solver = Solver(lanes=64), *, weights=None,
             starts: Mapping | None = None) -> Estimate:
  """Fits the problem as a JAX function: the stages of `fit` (fit_stages.best_of_starts, from
  `starts`, the law's own by default; concrete), then one jaxopt.LBFGS run from the best start whose
  result is differentiable, by implicit differentiation, in the losses and the row `weights`.
  Works inside jax.jit (one compilation per data shape), jax.vmap (over studies of the same
  shape) and jax.grad; `bootstrap.bootstrap(estimate, resampling)` refits its resamples, traced.

  Needs 64-bit mode (jax.enable_x64): in float32 the Huber objective's kinks at delta = 1e-3 are
  lost in rounding, so a float32 call is a TypeError, not a silently wrong fit.
  """
  data = {k: jnp.asarray(v) for k, v in problem.data.items()}
  _check_float64(data)
  const = jax.lax.stop_gradient
  frozen = dataclasses.replace(problem, data={k: const(v) for k, v in data.items()},
                               fixed={k: jnp.asarray(v) for k, v in problem.fixed.items()})
  weights = jnp.ones(frozen.n_rows) if weights is None else jnp.asarray(weights)
  ends, best = fit_stages.best_of_starts(frozen, start_points(problem, starts), const(weights),
                                         solver, fit_stages.TRACED)
  params, state = solve(problem.law, frozen.params(ends.x_SP[best]), data, weights,
                        delta=problem.delta, fixed=frozen.fixed, stop=solver.stop)
  return Estimate(frozen, params, state.value, state.error <= solver.stop.tol, weights)
