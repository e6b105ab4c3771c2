"""Bootstrap refits (rows or whole groups resampled) in the lane engine, and what they give:
standard errors, 95% percentile intervals (also of derived quantities) and, for the familial law,
one-sided tests of gamma > 0.

Every refit converges or is accounted for: refits start from the full-data optimum in
coordinates whitened by the full-data Hessian there (stages.whiten); those that stop unconverged
are continued, whitened at their own point by their own objective, and every refit is then
restarted with a fresh L-BFGS memory until none moves (stages.settle); a second path,
screened grid starts and grid restarts settle resamples with several minima (see `bootstrap`);
the rest are failed, excluded from the SEs and intervals, and counted.

Shape letters: B resamples (refits), R data rows, S starts, P parameters, C screened starts per
refit.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import numpy as np

from famjax.scaling import fit as fitlib
from famjax.scaling import stages
from famjax.scaling.lanes import Outcome
from famjax.scaling.laws import Law
from famjax.scaling.problem import Coordinates, Problem, Solver, problem


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
  n: int
  samples: dict[str, np.ndarray]  # natural parameters and derived quantities, [n] each
  se: dict[str, float]
  ci95: dict[str, tuple[float, float]]
  converged: float  # share of refits that converged (see fit.fit)
  failed: int = 0  # refits excluded from se and ci95 (nan in samples): no retry converged
  multimodal: int = 0  # refits whose resample showed several minima (a second path or a screened
  #                      grid start ended lower), or that needed grid restarts to converge


def resample_counts(n_rows: int, n: int, seed: int, groups: Sequence | None = None) -> np.ndarray:
  """[n, n_rows] row multiplicities: stages.resample_counts with jax.random.key(seed), the groups
  given by any labels (one per row)."""
  if groups is not None:
    groups = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
  with jax.enable_x64(True):
    return np.asarray(stages.resample_counts(jax.random.key(seed), n_rows, n, groups))


def derived(natural: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Compute-optimal exponents N* ~ C^a, D* ~ C^b for C = 6ND: a = beta/(alpha+beta), b = 1 - a."""
  total = natural["alpha"] + natural["beta"]
  return {"a_opt": natural["beta"] / total, "b_opt": natural["alpha"] / total}


RETRY_GRID_EVERY = 10  # thinning of the law's grid that arbitrates between refits' paths
PILOT_EVERY = 10  # every k-th refit also takes the second path; all do if one pilot disagrees
BOTH_PATHS_MAX_ROWS = 100  # studies this small: every refit takes both paths (they are cheap,
#                            and one resample in a hundred can have a second minimum)
DISAGREE_RTOL = 1e-7  # relative objective gap by which a second path or start "ends lower"


def _lower(a: Outcome, b: Outcome) -> np.ndarray:
  """Per refit, whether b reached an objective lower than a's by more than DISAGREE_RTOL."""
  return np.asarray(b.value_S < a.value_S * (1 - DISAGREE_RTOL))


def _lower_of(a: Outcome, b: Outcome) -> Outcome:
  """Per refit, the lower-objective of two outcomes (a where b's is not lower)."""
  return b.where(b.value_S < np.where(np.isfinite(a.value_S), a.value_S, np.inf), a, np)


def _grid_points(p: Problem, every: int = 1) -> np.ndarray:
  """[S, P] distinct points of the law's grid in the free parameters (with a parameter fixed,
  each point of the others appears once per grid value of the fixed one)."""
  grid = p.law.grid(every)
  return np.unique(np.stack([grid[k] for k in p.names], -1), axis=0)


def _restart_from_grid(p: Problem, ends: Outcome, counts_BR, solver: Solver, index) -> Outcome:
  """Refits `index` from a thinned grid plus where they stopped; the best start of each is
  settled, and kept where it converged lower (or the refit had not converged)."""
  grid_SP = _grid_points(p, RETRY_GRID_EVERY)
  n_grid = len(grid_SP) + 1
  x_SP = np.concatenate([np.vstack([grid_SP, ends.x_SP[b]]) for b in index])
  found = stages.descend(p, x_SP, np.repeat(counts_BR[index], n_grid, axis=0), solver,
                         stages.host())
  value_BG = np.where(found.converged_S, found.value_S, np.inf).reshape(len(index), n_grid)
  found = found.take(np.arange(len(index)) * n_grid + np.argmin(value_BG, axis=1))
  found = stages.settle(p, found, counts_BR[index], solver, stages.host())
  return ends.put(index, stages.lower_converged(ends.take(index), found, np))


_lowest_grid_points = jax.jit(stages.lowest_grid_points, static_argnames=("k",))


def _two_paths(p: Problem, ends: Outcome, x_P, counts_BR, solver: Solver):
  """Refits that also take the law's own coordinates from the optimum (every refit of a study of
  up to BOTH_PATHS_MAX_ROWS rows, else every PILOT_EVERY-th, and all if one of those lands
  lower), each keeping the lower end; and which refits' second path ended lower."""
  n = len(ends.value_S)
  raw_path = lambda index: stages.refits(p, np.broadcast_to(x_P, (len(index), x_P.size)),
                                          counts_BR[index], solver, stages.host())
  pilot = np.arange(0, n, 1 if p.n_rows <= BOTH_PATHS_MAX_ROWS else PILOT_EVERY)
  raw = raw_path(pilot)
  # the second path reached a lower minimum than the first: the first may have missed it (the
  # reverse is common without several minima: plain L-BFGS stalls above the optimum)
  if len(pilot) < n and _lower(ends.take(pilot), raw).any():
    pilot = np.arange(n)  # several minima: every refit takes both paths
    raw = raw_path(pilot)
  paths_differ = np.zeros(n, bool)
  paths_differ[pilot] = _lower(ends.take(pilot), raw)
  return ends.put(pilot, _lower_of(ends.take(pilot), raw)), paths_differ


def bootstrap(law: Law, data: Mapping, result: fitlib.FitResult, *, n: int = 4000, seed: int = 0,
              groups: Sequence | None = None, solver: Solver = Solver(),
              progress: bool = False) -> BootstrapResult:
  """Refits on n resamples, each started from the full-data optimum `result` (with its Huber
  delta and fixed parameters).

  Small studies can have resamples whose objective has several local minima, where refits from
  the same start reach different ones by different paths, or none reaches the lowest. So refits
  also take a second path (`_two_paths`), and every refit of a study of up to
  stages.SCREENED_MAX_ROWS rows also runs from the stages.SCREENED_STARTS grid points lowest in
  its own objective. Each refit whose second path found a lower objective (or that did not
  converge) is settled by a thinned grid of restarts. Refits that still have not converged are
  failed.
  """
  with jax.enable_x64(True):
    p = problem(law, data, result.params, fixed=result.fixed, delta=result.delta)
    counts_BR = resample_counts(p.n_rows, n, seed, groups)
    x_P = np.array([result.params[k] for k in p.names])
    at = stages.whiten(p, x_P[None], np.ones((1, p.n_rows)), solver, stages.host())
    ends = stages.descend(p, np.broadcast_to(x_P, (n, x_P.size)), counts_BR, solver,
                          stages.host("bootstrap" if progress else None),
                          Coordinates(at.origin[0], at.basis[0]))
    ends = stages.settle(p, ends, counts_BR, solver, stages.host())
    ends, paths_differ = _two_paths(p, ends, x_P, counts_BR, solver)
    screened_lower = np.zeros(n, bool)
    if p.n_rows <= stages.SCREENED_MAX_ROWS:
      grid_SP = _grid_points(p)
      top_BC = _lowest_grid_points(p, grid_SP, counts_BR)
      found = stages.screened(p, grid_SP, counts_BR, np.asarray(top_BC), solver, stages.host())
      # several minima: a screened start converged lower than a converged refit
      screened_lower = ends.converged_S & found.converged_S & _lower(ends, found)
      ends = stages.lower_converged(ends, found, np)
    unsettled = paths_differ | ~ends.converged_S
    if unsettled.any():
      ends = _restart_from_grid(p, ends, counts_BR, solver, np.flatnonzero(unsettled))
    natural = stages.natural_samples(p, ends, np)
    if "alpha" in natural and "beta" in natural:
      natural.update(derived(natural))
    se, ci95 = stages.interval_summary(natural, np)
  converged_B = np.asarray(ends.converged_S)
  return BootstrapResult(n=n, samples=natural, se=jax.tree.map(float, se),
                         ci95={k: tuple(map(float, v)) for k, v in ci95.items()},
                         converged=float(np.mean(converged_B)),
                         failed=int((~converged_B).sum()),
                         multimodal=int((unsettled | screened_lower).sum()))


def gamma_test(boot: BootstrapResult, gamma: float) -> dict[str, float | int | str]:
  """H0: gamma <= 0 against H1: gamma > 0, by inverting one-sided bootstrap intervals of the same
  refits (whole runs resampled; valid for the Huber fit, which has no likelihood):
  `p_percentile` = share of refits with gamma* <= 0 (the percentile interval's lower end reaches
  0 at level 1 - p); `p_basic` = share with gamma* >= 2 gamma (the basic interval's). They differ
  where the refits' distribution is skewed. With n refits, p = 0 means p < 1/n."""
  gamma_B = boot.samples["gamma"][np.isfinite(boot.samples["gamma"])]  # converged refits
  return {"hypothesis": "H1: gamma > 0 (one-sided)", "gamma": float(gamma),
          "n_refits": int(gamma_B.size),
          "p_percentile": float(np.mean(gamma_B <= 0.0)),
          "p_basic": float(np.mean(gamma_B >= 2 * gamma))}
