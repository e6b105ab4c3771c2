"""Bootstrap refits (rows or whole groups resampled) in the lane engine, and what they give:
standard errors, 95% percentile intervals (also of derived quantities) and, for the familial law,
two tests of gamma > 0.

Every refit converges or is accounted for: refits start from the full-data optimum in
coordinates whitened by the full-data Hessian there (fit.whitened); those that stop unconverged
are continued, whitened at their own point by their own objective, and every refit is then
restarted with a fresh L-BFGS memory until none moves (fit.refine, fit.restart); a second path,
screened grid starts and grid restarts settle resamples with several minima (see `bootstrap`);
the rest are failed, excluded from the SEs and intervals, and counted.

Shape letters: B resamples (refits), R data rows, S starts, P parameters, C screened starts per
refit.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from famjax.scaling import fit as fitlib
from famjax.scaling.laws import FAMILIAL, Law, to_natural_params


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
  """[n, n_rows] row multiplicities: rows drawn with replacement, or whole groups if given."""
  rng = np.random.default_rng(seed)
  if groups is None:
    return rng.multinomial(n_rows, np.full(n_rows, 1.0 / n_rows), size=n).astype(np.float64)
  labels, group_of_row = np.unique(np.asarray(groups), return_inverse=True)
  group_counts = rng.multinomial(len(labels), np.full(len(labels), 1.0 / len(labels)), size=n)
  return group_counts[:, group_of_row].astype(np.float64)


def derived(natural: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Compute-optimal exponents N* ~ C^a, D* ~ C^b for C = 6ND: a = beta/(alpha+beta), b = 1 - a."""
  total = natural["alpha"] + natural["beta"]
  return {"a_opt": natural["beta"] / total, "b_opt": natural["alpha"] / total}


RETRY_GRID_EVERY = 10  # thinning of the law's grid that arbitrates between refits' paths
PILOT_EVERY = 10  # every k-th refit also takes the second path; all do if one pilot disagrees
BOTH_PATHS_MAX_ROWS = 100  # studies this small: every refit takes both paths (they are cheap,
#                            and one resample in a hundred can have a second minimum)
DISAGREE_RTOL = 1e-7  # relative objective gap by which a second path or start "ends lower"


def _lower(a, b):
  """Per refit, whether triple b reached an objective lower than a's by more than DISAGREE_RTOL."""
  return b[1] < a[1] * (1 - DISAGREE_RTOL)


def _best(a, b):
  """Per refit, the lower-objective of two (params, objective, converged) triples."""
  take_b = b[1] < np.where(np.isfinite(a[1]), a[1], np.inf)
  params = {k: np.where(take_b, b[0][k], a[0][k]) for k in a[0]}
  return params, np.where(take_b, b[1], a[1]), np.where(take_b, b[2], a[2])


def _converged_only(triple):
  """The triple with an infinite objective wherever it did not converge (never the lower)."""
  return triple[0], np.where(triple[2], triple[1], np.inf), triple[2]


def _lowest_of_each(triple, n, k):
  """Indices of the lowest converged of each run of k consecutive starts (n runs)."""
  return np.arange(n) * k + np.argmin(_converged_only(triple)[1].reshape(n, k), axis=1)


def _subset(triple, index):
  params, value, converged = triple
  return {k: v[index] for k, v in params.items()}, value[index], converged[index]


def _put(triple, index, part):
  params, value, converged = (dict((k, v.copy()) for k, v in triple[0].items()),
                              triple[1].copy(), triple[2].copy())
  for k in params:
    params[k][index] = part[0][k]
  value[index], converged[index] = part[1], part[2]
  return params, value, converged


def _grid_points(law, names, every=1):
  """[S, P] distinct points of the law's grid in the free parameters `names` (with a parameter
  fixed, each point of the others appears once per grid value of the fixed one)."""
  grid = law.grid(every)
  return np.unique(np.stack([grid[k] for k in names], -1), axis=0)


def _raw_path(law, result, data, counts_BR, fixed, options, index):
  """Refits `index` from the optimum in the law's own coordinates (the path a plain L-BFGS
  takes), refined."""
  inits = {k: np.full(len(index), v) for k, v in result.params.items()}
  triple = fitlib.solve_batch(law, inits, data, counts_BR[index], fixed, **options)
  return fitlib.refine(law, *triple, data, counts_BR[index], fixed, **options)


def _restart_from_grid(law, data, triple, counts_BR, fixed, options, index):
  """Refits `index` from a thinned grid plus where they stopped; the best start of each is
  refined, and kept where it converged lower."""
  names = tuple(triple[0])
  grid_SP = _grid_points(law, names, RETRY_GRID_EVERY)
  n_grid = len(grid_SP) + 1
  starts = {k: np.concatenate([np.append(grid_SP[:, i], triple[0][k][b]) for b in index])
            for i, k in enumerate(names)}
  weights = np.repeat(counts_BR[index], n_grid, axis=0)
  found = fitlib.solve_batch(law, starts, data, weights, fixed, **options)
  best = _lowest_of_each(found, len(index), n_grid)
  found = fitlib.refine(law, *_subset(found, best), data, counts_BR[index], fixed, **options)
  return _put(triple, index, _best(_subset(triple, index), _converged_only(found)))


_lowest_grid_points = jax.jit(fitlib.lowest_grid_points,
                              static_argnames=("law", "names", "delta", "k"))


def _restart_from_screened(law, data, triple, counts_BR, fixed, options):
  """Every refit also runs from the fit.SCREENED_STARTS points of the law's grid lowest in its
  resample's objective (refined); the lowest converged end replaces the refit where it is lower
  or where the refit did not converge. Returns the triple and which converged refits it
  lowered (their resamples have several minima)."""
  names = tuple(triple[0])
  grid_SP = _grid_points(law, names)
  top_BC = np.asarray(_lowest_grid_points(law, names, grid_SP, data, counts_BR, fixed,
                                          delta=options["delta"]))
  n, c = top_BC.shape
  weights = np.repeat(counts_BR, c, axis=0)
  starts = {k: grid_SP[top_BC.ravel(), i] for i, k in enumerate(names)}
  found = fitlib.solve_batch(law, starts, data, weights, fixed, **options)
  found = fitlib.refine(law, *found, data, weights, fixed, **options)
  found = _converged_only(_subset(found, _lowest_of_each(found, n, c)))
  current = _converged_only(triple)
  return _best(current, found), triple[2] & _lower(current, found)


def bootstrap(law: Law, data: Mapping, result: fitlib.FitResult, *, n: int = 4000, seed: int = 0,
              groups: Sequence | None = None, delta: float = fitlib.DEFAULT_DELTA,
              stop: fitlib.StopRules = fitlib.StopRules(), lanes: int = fitlib.DEFAULT_LANES,
              progress: bool = False) -> BootstrapResult:
  """Refits on n resamples, each started from the full-data optimum `result`.

  Small studies can have resamples whose objective has several local minima, where refits from
  the same start reach different ones by different paths, or none reaches the lowest. So every
  refit of a study of up to BOTH_PATHS_MAX_ROWS rows, and every PILOT_EVERY-th of a larger one,
  also takes the law's own coordinates from the optimum; if any of those pilots lands elsewhere,
  every refit does. Every refit of a study of up to fit.SCREENED_MAX_ROWS rows also runs from
  the fit.SCREENED_STARTS grid points lowest in its own objective. Each refit whose second path
  found a lower objective (or that did not converge) is settled by a thinned grid of restarts.
  Refits that still have not converged are failed.
  """
  options = dict(delta=delta, stop=stop, lanes=lanes)
  with jax.enable_x64(True):
    data = fitlib.as_data(data)
    n_rows = int(data["loss"].shape[0])
    counts_BR = resample_counts(n_rows, n, seed, groups)
    fixed = {k: jnp.float64(v) for k, v in result.fixed.items()}
    inits = {k: np.full(n, v) for k, v in result.params.items()}
    coordinates = fitlib.whitened(law, result.params, data, delta=delta, fixed=fixed, lanes=lanes)
    triple = fitlib.solve_batch(law, inits, data, counts_BR, fixed, coordinates=coordinates,
                                progress=progress, desc="bootstrap", **options)
    triple = fitlib.refine(law, *triple, data, counts_BR, fixed, **options)
    pilot = np.arange(0, n, 1 if n_rows <= BOTH_PATHS_MAX_ROWS else PILOT_EVERY)
    raw = _raw_path(law, result, data, counts_BR, fixed, options, pilot)
    # the second path reached a lower minimum than the first: the first may have missed it (the
    # reverse is common without several minima: plain L-BFGS stalls above the optimum)
    if len(pilot) < n and _lower(_subset(triple, pilot), raw).any():
      # several minima: every refit takes both paths, and any two that end apart are settled
      everyone = np.arange(n)
      raw = _raw_path(law, result, data, counts_BR, fixed, options, everyone)
      pilot = everyone
    paths_differ = np.zeros(n, bool)
    paths_differ[pilot] = _lower(_subset(triple, pilot), raw)
    triple = _put(triple, pilot, _best(_subset(triple, pilot), raw))
    screened_lower = np.zeros(n, bool)
    if n_rows <= fitlib.SCREENED_MAX_ROWS:
      triple, screened_lower = _restart_from_screened(law, data, triple, counts_BR, fixed, options)
    unsettled = paths_differ | ~triple[2]
    if unsettled.any():
      triple = _restart_from_grid(law, data, triple, counts_BR, fixed, options,
                                  np.flatnonzero(unsettled))
  params_B, _, converged_B = triple
  natural = to_natural_params(params_B)
  natural = {k: np.where(converged_B, np.asarray(v), np.nan) for k, v in natural.items()}
  if "alpha" in natural and "beta" in natural:
    natural.update(derived(natural))
  ok = {k: v[converged_B] for k, v in natural.items()}
  enough = converged_B.sum() >= 2
  se = {k: float(np.std(v, ddof=1)) if enough else float("nan") for k, v in ok.items()}
  ci = {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) if enough
        else (float("nan"), float("nan")) for k, v in ok.items()}
  return BootstrapResult(n=n, samples=natural, se=se, ci95=ci,
                         converged=float(np.mean(converged_B)),
                         failed=int((~converged_B).sum()),
                         multimodal=int((unsettled | screened_lower).sum()))


def gamma_tests(data: Mapping, result: fitlib.FitResult, boot: BootstrapResult | None = None,
                **fit_kwargs) -> dict[str, float]:
  """Is gamma > 0?  Bootstrap p = share of refits with gamma <= 0; likelihood-ratio test of the
  familial law against gamma = 0, treating log residuals as Gaussian:
  n log(SSR_0 / SSR_1) ~ chi2(1).
  """
  from jax.scipy.stats import chi2
  if result.law != FAMILIAL.name:
    raise ValueError(f"gamma tests need a familial fit; got law={result.law!r}")
  with jax.enable_x64(True):
    null = fitlib.fit(FAMILIAL, data, fixed={"gamma": 0.0}, **fit_kwargs)
    arrays = fitlib.as_data(data)

    def ssr(params):
      residual = jnp.log(arrays["loss"]) - FAMILIAL.log_loss(params, arrays)
      return float(jnp.sum(residual ** 2))

    n_rows = int(arrays["loss"].shape[0])
    stat = max(0.0, n_rows * float(np.log(ssr({**null.params, "gamma": 0.0}) / ssr(result.params))))
    out = {"gamma": result.params["gamma"], "lrt_stat": stat, "lrt_p": float(chi2.sf(stat, 1)),
           "null_objective": null.objective}
  if boot is not None:
    gamma = boot.samples["gamma"][np.isfinite(boot.samples["gamma"])]  # converged refits
    out["bootstrap_p"] = float(np.mean(gamma <= 0.0))
  return out
