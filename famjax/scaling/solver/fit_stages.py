"""The fitter's stages, written once: descend, polish, refine, restart, screened starts, and the
bootstrap's resampling and summary.

An `Engine` says how a stage's starts run: `TRACED` runs them in one traced loop with exact
Hessians, rounds of a stage in a fori_loop (`fit.estimate` and `bootstrap.bootstrap` of an
Estimate: pure JAX); `HOST` drives the same compiled loop from the host in chunks, on the active
starts only, with finite-difference Hessians from that loop (`fit.fit`, `bootstrap.bootstrap` of
a FitResult). Both run the same rounds.

Shape letters: S starts, P parameters, R data rows, B resamples, C screened starts per resample.
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from famjax.scaling.laws import to_natural_name
from famjax.scaling.problem_and_solver import Coordinates, Problem, Solver, StopRules, whitening
from famjax.scaling.solver import vmapped_lbfgs

FD_STEP = 1e-5  # central differences of the gradient, for the host's Hessians
REFINE_ROUNDS = 3  # rounds of re-whitening an unconverged start at its own point
RESTART_ROUNDS = 4  # rounds of fresh-memory continuation of the starts that still move
RESTART_RTOL = 1e-7  # a continuation "moves" when it lowers the objective by more than this of it
# per bootstrap refit of a small study: the starts lowest in the resample's objective, each
# run to convergence. On a 20-row study 5 of 1000 resamples have a lower minimum than the refit
# from the optimum reaches, and which of the few lowest starts reach it depends on the CPU's
# floating-point code path (2 starts missed 5 of them on one CPU, a different 5 under AVX2); with
# 6 or more, the same 2 of 1000 stay missed on both (docs/fitter.md)
SCREENED_STARTS = 8
# studies up to this size screen every refit; at 60 rows screening lowered none of 1000 refits,
# and it would make a 90-row familial bootstrap 8x slower
SCREENED_MAX_ROWS = 50
N_POLISHED = 8  # a fit's lowest starts rerun in coordinates whitened at the lowest
SCREEN_BATCH = 512  # resamples screened at a time ([batch, S] objectives in memory)

Outcome = vmapped_lbfgs.Outcome


class Engine(NamedTuple):
  run: Callable  # (problem, queue, solver, active_S) -> Outcome
  hessians: Callable  # (problem, x_SP, weights_SR, solver, active_S) -> [S, P, P]
  xp: ModuleType  # the array library of the stages' own arithmetic: numpy on the host (no
  #                 dispatch or compilation per operation and shape), jax.numpy when traced

  def shown(self, desc: str | None) -> "Engine":
    """This engine with a progress bar named `desc` over each run's starts (host only)."""
    return self._replace(run=functools.partial(_host_run, desc=desc)) if self.xp is np else self


def _exact_hessians(problem: Problem, x_SP, weights_SR, solver: Solver, active_S=None):
  del solver, active_S
  weights_SR = jnp.broadcast_to(weights_SR, (x_SP.shape[0], problem.n_rows))
  return jax.vmap(jax.hessian(problem.objective))(x_SP, weights_SR)


def _fd_hessians(problem: Problem, x_SP, weights_SR, solver: Solver, active_S=None):
  """Central differences (FD_STEP) of gradients that the lane engine evaluates (maxiter 0), so
  they cost no compilation of their own; nan where a start is not active."""
  x_SP = np.asarray(x_SP, np.float64)
  n, p = x_SP.shape
  index = np.arange(n) if active_S is None else np.flatnonzero(active_S)
  hessian_SPP = np.full((n, p, p), np.nan)
  if not index.size:
    return hessian_SPP
  offsets_KP = FD_STEP * np.concatenate([np.eye(p), -np.eye(p)])
  points = (x_SP[index, None, :] + offsets_KP[None]).reshape(-1, p)
  weights = np.broadcast_to(np.asarray(weights_SR, np.float64), (n, problem.n_rows))[index]
  evaluate = Solver(StopRules(maxiter=0, maxls=1), solver.lanes)
  queue = vmapped_lbfgs.queue(points, np.repeat(weights, 2 * p, axis=0), xp=np)
  out = vmapped_lbfgs.run(problem, queue, evaluate)
  grad_SKP = out.grad_SP.reshape(len(index), 2 * p, p)
  hessian_SPP[index] = (grad_SKP[:, :p] - grad_SKP[:, p:]) / (2 * FD_STEP)
  return hessian_SPP


def _host_run(problem: Problem, q: vmapped_lbfgs.Queue, solver: Solver, active_S=None, *,
              desc=None):
  try:
    from tqdm.auto import tqdm
  except ImportError:  # the light fitter's install has no tqdm: no progress bar
    return vmapped_lbfgs.run(problem, q, solver, active_S=active_S)
  n = len(q.z_SP) if active_S is None else int(np.sum(active_S))
  with tqdm(total=n, desc=desc, unit="start", disable=desc is None) as bar:
    return vmapped_lbfgs.run(problem, q, solver, active_S, progress=bar)


TRACED = Engine(vmapped_lbfgs.solve, _exact_hessians, jnp)


HOST = Engine(_host_run, _fd_hessians, np)


def whiten(problem: Problem, x_SP, weights_SR, solver: Solver, engine: Engine,
           active_S=None) -> Coordinates:
  """Coordinates centred on each point x_SP[s] in which the objective with row weights
  weights_SR[s] has the identity as its Hessian there. Near an optimum L-BFGS then starts with
  the right curvature: refits of Epoch's data converge in a few steps, where in the law's own
  coordinates (Hessian eigenvalues 1e-4..1e3) they take hundreds."""
  xp = engine.xp
  hessian_SPP = engine.hessians(problem, x_SP, weights_SR, solver, active_S)
  return whitening(xp.asarray(hessian_SPP), xp.asarray(x_SP, xp.float64), xp)


def descend(problem: Problem, x_SP, weights_SR, solver: Solver, engine: Engine,
            coordinates: Coordinates | None = None, active_S=None) -> Outcome:
  """L-BFGS from every start x_SP (the active ones) in the given coordinates."""
  q = vmapped_lbfgs.queue(x_SP, weights_SR, coordinates, engine.xp)
  return engine.run(problem, q, solver, active_S)


def polish(problem: Problem, x_SP, around_P, weights_R, solver: Solver,
           engine: Engine) -> Outcome:
  """Reruns the starts x_SP from where they stopped, in coordinates whitened at around_P."""
  at = whiten(problem, engine.xp.asarray(around_P)[None], weights_R[None], solver, engine)
  return descend(problem, x_SP, weights_R[None], solver, engine,
                 Coordinates(at.origin[0], at.basis[0]))


def _repeat(engine: Engine, n: int, body: Callable, carry):
  """body(carry) n times: a Python loop on the host, a fori_loop when traced (one compiled round,
  not n unrolled: the program's compile time stays that of one)."""
  if engine.xp is np:
    for _ in range(n):
      carry = body(carry)
    return carry
  return jax.lax.fori_loop(0, n, lambda _, c: body(c), carry)


def refine(problem: Problem, ends: Outcome, weights_SR, solver: Solver,
           engine: Engine) -> Outcome:
  """Continues every unconverged start from where it stopped, in coordinates whitened at its own
  point by its own objective, for REFINE_ROUNDS rounds; a continuation replaces a start only
  where it lowers the objective."""
  xp = engine.xp

  def one_round(ends):
    todo_S = ~ends.converged_S & xp.isfinite(ends.value_S)
    coordinates = whiten(problem, ends.x_SP, weights_SR, solver, engine, todo_S)
    new = descend(problem, ends.x_SP, weights_SR, solver, engine, coordinates, todo_S)
    better_S = todo_S & (new.value_S <= ends.value_S)
    return new.where(better_S, ends, xp)._replace(
        converged_S=xp.where(todo_S, better_S & new.converged_S, ends.converged_S))

  return _repeat(engine, REFINE_ROUNDS, one_round, ends)


def restart(problem: Problem, ends: Outcome, weights_SR, solver: Solver,
            engine: Engine) -> Outcome:
  """Continues every start from where it stopped with a fresh L-BFGS memory, in the law's own
  coordinates, and again for those that moved (lowered the objective by > RESTART_RTOL of it),
  for RESTART_ROUNDS rounds. An L-BFGS can stall short of a minimum on the Huber
  objective's kinks with a curvature memory that no longer fits (stop.ftol then ends it as
  converged); a fresh start from the same point goes on."""
  def one_round(carry):
    ends, todo_S = carry
    new = descend(problem, ends.x_SP, weights_SR, solver, engine, None, todo_S)
    todo_S = todo_S & (new.value_S < ends.value_S * (1 - RESTART_RTOL))
    return new.where(todo_S, ends, engine.xp), todo_S

  return _repeat(engine, RESTART_ROUNDS, one_round, (ends, engine.xp.isfinite(ends.value_S)))[0]


def settle(problem: Problem, ends: Outcome, weights_SR, solver: Solver,
           engine: Engine) -> Outcome:
  """`refine`, then `restart`."""
  ends = refine(problem, ends, weights_SR, solver, engine)
  return restart(problem, ends, weights_SR, solver, engine)


def best_of_starts(problem: Problem, starts_SP, weights_R, solver: Solver, engine: Engine,
                 progress: bool = False) -> tuple[Outcome, jax.Array]:
  """The fit: L-BFGS from every start; the N_POLISHED lowest ends rerun from where they
  stopped in coordinates whitened at the lowest (`polish`) and settled. Returns every start's
  end and the best one's index: the lowest converged objective (the lowest finite one if none
  converged)."""
  xp = engine.xp
  starts = descend(problem, starts_SP, weights_R[None], solver,
                   engine.shown("fit" if progress else None))
  finite_S = xp.where(xp.isfinite(starts.value_S), starts.value_S, xp.inf)
  polished = xp.argsort(finite_S)[:min(N_POLISHED, len(starts_SP))]
  top = polish(problem, starts.x_SP[polished], starts.x_SP[polished[0]], weights_R, solver,
               engine.shown("polish" if progress else None))
  top = settle(problem, top, weights_R[None], solver, engine)
  ends = starts.put(polished, top, xp)
  best = xp.argmin(xp.where(xp.where(ends.converged_S.any(), ends.converged_S,
                                     xp.isfinite(ends.value_S)), ends.value_S, xp.inf))
  return ends, best


def refits(problem: Problem, x_BP, counts_BR, solver: Solver, engine: Engine,
           coordinates: Coordinates | None = None) -> Outcome:
  """Refits of resampled rows (counts_BR) from x_BP in the given coordinates, settled."""
  ends = descend(problem, x_BP, counts_BR, solver, engine, coordinates)
  return settle(problem, ends, counts_BR, solver, engine)


def lowest_start_points(problem: Problem, starts_SP, weights_BR, k: int = SCREENED_STARTS):
  """[B, C] indices of the k points of starts_SP with the lowest objective for each row weighting:
  one [B, R] x [R, S] product, since the objective is linear in the row weights. Pure JAX."""
  losses_SR = jax.vmap(problem.row_losses)(jnp.asarray(starts_SP))
  finite_S = jnp.all(jnp.isfinite(losses_SR), axis=1)
  losses_SR = jnp.where(finite_S[:, None], losses_SR, 0.0)
  lowest = lambda weights_R: jax.lax.top_k(
      jnp.where(finite_S, -(losses_SR @ weights_R), -jnp.inf), min(k, len(starts_SP)))[1]
  return jax.lax.map(lowest, jnp.asarray(weights_BR), batch_size=SCREEN_BATCH)


def screened(problem: Problem, starts_SP, counts_BR, top_BC, solver: Solver,
             engine: Engine) -> Outcome:
  """[B] refits from each resample's screened starts top_BC: the lowest converged end."""
  xp, (n, c) = engine.xp, top_BC.shape
  found = refits(problem, xp.asarray(starts_SP)[xp.asarray(top_BC).reshape(-1)],
                 xp.repeat(xp.asarray(counts_BR), c, axis=0), solver, engine)
  value_BC = xp.where(found.converged_S, found.value_S, xp.inf).reshape(n, c)
  return found.take(xp.arange(n) * c + xp.argmin(value_BC, axis=1))


def lower_converged(current: Outcome, found: Outcome, xp=jnp) -> Outcome:
  """found where it converged lower than current (or current did not converge)."""
  lower_B = found.converged_S & (
      found.value_S < xp.where(current.converged_S, current.value_S, xp.inf))
  return found.where(lower_B, current, xp)


def interval_summary(samples: dict, xp=jnp) -> tuple[dict, dict]:
  """Standard error and 95% percentile interval of each [B] sample over its non-nan entries
  (nan when fewer than two)."""
  se, ci95 = {}, {}
  with warnings.catch_warnings():  # numpy warns over samples of fewer than two
    warnings.simplefilter("ignore", RuntimeWarning)
    for k, v in samples.items():
      enough = xp.sum(~xp.isnan(v)) >= 2
      se[k] = xp.where(enough, xp.nanstd(v, ddof=1), xp.nan)
      ci95[k] = tuple(xp.where(enough, xp.nanpercentile(v, q), xp.nan) for q in (2.5, 97.5))
  return se, ci95


def natural_samples(problem: Problem, ends: Outcome, xp=jnp) -> dict:
  """Natural parameters (E, A, B, exponents) of converged refits, nan elsewhere, [B] each."""
  x_BP = xp.where(ends.converged_S[:, None], ends.x_SP, xp.nan)
  return {to_natural_name(k): xp.exp(v) if to_natural_name(k) != k else v
          for k, v in problem.params(x_BP.T).items()}
