"""Bootstrap refits (rows or whole groups resampled) and what they give: standard errors, 95%
percentile intervals (also of derived quantities) and, for the familial law, one-sided tests of
gamma > 0.

One procedure (`refit_resamples`), run by either engine of fit_stages.py: `bootstrap` of a host
FitResult drives it from the host with a progress bar; of an `fit.Estimate` it is traced (jit,
vmap; its results carry no gradient), masked queues standing in for the host's index sets. Every
refit converges or is accounted for: refits start from the full-data optimum in coordinates
whitened by the full-data Hessian there (fit_stages.whiten); those that stop unconverged are
continued, whitened at their own point by their own objective, and every refit is then restarted
with a fresh L-BFGS memory until none moves (fit_stages.settle); a second path, screened starts and
restarts from thinned starts settle resamples with several minima (see `refit_resamples`); the
rest are failed, excluded from the SEs and intervals, and counted.

Shape letters: B resamples (refits), R data rows, S starts, P parameters, C screened starts per
refit, K refits restarted from thinned starts, T starts of a restart.
"""

from __future__ import annotations

import contextlib
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from famjax.scaling.fitting import Estimate, FitResult
from famjax.scaling.problem_and_solver import Coordinates, Problem, Solver, start_points
from famjax.scaling.resampling import Resampling
from famjax.scaling.solver import fit_stages
from famjax.scaling.solver.vmapped_lbfgs import Outcome


class Bootstrap(NamedTuple):
  """Refits of n resamples: natural parameters and derived quantities of each ([B]; nan where a
  refit failed), whether each converged and showed several minima, and the summaries over the
  converged ones. numpy and floats from the host; arrays when traced."""
  samples: dict
  converged_B: jax.Array | np.ndarray  # [B] bool
  multimodal_B: jax.Array | np.ndarray  # [B] bool: a second path or a screened start
  #                                       ended lower, or restarts were needed
  se: dict
  ci95: dict  # name -> (low, high)

  @property
  def n(self) -> int:
    return len(self.converged_B)

  @property
  def failed(self) -> int:
    """Refits excluded from se and ci95 (nan in samples): no retry converged."""
    return int((~np.asarray(self.converged_B)).sum())

  @property
  def converged_share(self) -> float:
    return float(np.mean(self.converged_B))

  @property
  def multimodal(self) -> int:
    return int(np.asarray(self.multimodal_B).sum())


def derived(natural: Mapping) -> dict:
  """Compute-optimal exponents N* ~ C^a, D* ~ C^b for C = 6ND: a = beta/(alpha+beta), b = 1 - a."""
  total = natural["alpha"] + natural["beta"]
  return {"a_opt": natural["beta"] / total, "b_opt": natural["alpha"] / total}


RETRY_STARTS_EVERY = 10  # thinning of the law's starts that arbitrates between refits' paths
RESTART_BLOCK = 32  # traced: refits restarted from thinned starts at a time ([K * T] queued)
PILOT_EVERY = 10  # every k-th refit also takes the second path; all do if one pilot disagrees
BOTH_PATHS_MAX_ROWS = 100  # studies this small: every refit takes both paths (they are cheap,
#                            and one resample in a hundred can have a second minimum)
DISAGREE_RTOL = 1e-7  # relative objective gap by which a second path or start "ends lower"


def _lower(a: Outcome, b: Outcome):
  """Per refit, whether b reached an objective lower than a's by more than DISAGREE_RTOL."""
  return b.value_S < a.value_S * (1 - DISAGREE_RTOL)


def _lower_of(a: Outcome, b: Outcome, xp) -> Outcome:
  """Per refit, the lower-objective of two outcomes (a where b's is not lower)."""
  return b.where(b.value_S < xp.where(xp.isfinite(a.value_S), a.value_S, xp.inf), a, xp)


def _two_paths(p: Problem, ends: Outcome, x_P, counts_BR, solver: Solver,
               engine: fit_stages.Engine):
  """Refits that also take the law's own coordinates from the optimum (every refit of a study of
  up to BOTH_PATHS_MAX_ROWS rows, else every PILOT_EVERY-th, and all if one of those lands
  lower), each keeping the lower end; and which refits' second path ended lower."""
  xp, n = engine.xp, counts_BR.shape[0]
  start_BP = xp.broadcast_to(x_P, (n, x_P.size))
  raw_path = lambda active_B: fit_stages.settle(
      p, fit_stages.descend(p, start_BP, counts_BR, solver, engine, None, active_B), counts_BR,
      solver, engine)
  pilot_B = np.arange(n) % (1 if p.n_rows <= BOTH_PATHS_MAX_ROWS else PILOT_EVERY) == 0
  raw = raw_path(pilot_B)
  if not pilot_B.all():
    # the second path reached a lower minimum than the first: the first may have missed it
    # (the reverse is common without several minima: plain L-BFGS stalls above the optimum)
    several_minima = (_lower(ends, raw) & pilot_B).any()  # then every refit takes both paths
    if xp is not np or several_minima:  # traced, this runs no start unless several minima
      raw = raw.where(pilot_B, raw_path(~pilot_B & several_minima), xp)
  return _lower_of(ends, raw, xp), _lower(ends, raw)


def _screened(p: Problem, ends: Outcome, counts_BR, solver: Solver, engine: fit_stages.Engine):
  """Each refit also from the fit_stages.SCREENED_STARTS of the law's starts lowest in its own
  objective, the lowest converged end kept; and which refits a screened start lowered."""
  starts_SP = start_points(p, distinct=True)
  top_BC = _lowest_start_points(p, starts_SP, counts_BR, engine.xp)
  found = fit_stages.screened(p, starts_SP, counts_BR, top_BC, solver, engine)
  lowered_B = ends.converged_S & found.converged_S & _lower(ends, found)
  return fit_stages.lower_converged(ends, found, engine.xp), lowered_B


_jit_lowest_start_points = jax.jit(fit_stages.lowest_start_points, static_argnames=("k",))


def _lowest_start_points(p: Problem, starts_SP, counts_BR, xp):
  if xp is np:  # one compiled program, not an eager op per step
    return np.asarray(_jit_lowest_start_points(p, starts_SP, counts_BR))
  return fit_stages.lowest_start_points(p, starts_SP, counts_BR)


def _restart_from_starts(p: Problem, ends: Outcome, counts_BR, solver: Solver,
                         engine: fit_stages.Engine, index_K, valid_K=None) -> Outcome:
  """Refits index_K (those where valid_K) from thinned starts plus where they stopped; the best
  start of each is settled, and kept where it converged lower (or the refit had not)."""
  xp = engine.xp
  starts_TP = xp.asarray(start_points(p, every=RETRY_STARTS_EVERY, distinct=True))
  n_tries, k = len(starts_TP) + 1, len(index_K)
  x_KTP = xp.concatenate([xp.broadcast_to(starts_TP, (k,) + starts_TP.shape),
                          ends.x_SP[index_K][:, None]], axis=1)
  counts_KR = counts_BR[index_K]
  active = None if valid_K is None else xp.repeat(valid_K, n_tries)
  found = fit_stages.descend(p, x_KTP.reshape(k * n_tries, -1),
                             xp.repeat(counts_KR, n_tries, axis=0), solver, engine, None, active)
  value_KT = xp.where(found.converged_S, found.value_S, xp.inf).reshape(k, n_tries)
  found = found.take(xp.arange(k) * n_tries + xp.argmin(value_KT, axis=1))
  found = fit_stages.settle(p, found, counts_KR, solver, engine)
  kept = fit_stages.lower_converged(ends.take(index_K), found, xp)
  if valid_K is not None:
    index_K = xp.where(valid_K, index_K, counts_BR.shape[0])  # out of range: dropped
  return ends.put(index_K, kept, xp)


def _restart_unsettled(p: Problem, ends: Outcome, counts_BR, unsettled_B, solver: Solver,
                       engine: fit_stages.Engine) -> Outcome:
  """`_restart_from_starts` for every unsettled refit: all at once from the host; traced, in
  blocks of RESTART_BLOCK until none is left (a loop that runs no block when none is)."""
  if engine.xp is np:
    index = np.flatnonzero(unsettled_B)
    return _restart_from_starts(p, ends, counts_BR, solver, engine, index) if index.size else ends
  n = counts_BR.shape[0]
  k = min(RESTART_BLOCK, n)

  def block(carry):
    ends, todo_B = carry
    index_K = jnp.nonzero(todo_B, size=k, fill_value=n)[0]
    valid_K = index_K < n
    ends = _restart_from_starts(p, ends, counts_BR, solver, engine, jnp.minimum(index_K, n - 1),
                                valid_K)
    return ends, todo_B.at[index_K].set(False, mode="drop")

  return jax.lax.while_loop(lambda c: c[1].any(), block, (ends, unsettled_B))[0]


def refit_resamples(p: Problem, x_P, counts_BR, solver: Solver, engine: fit_stages.Engine,
                    progress: bool = False) -> tuple[Outcome, jax.Array]:
  """Refits on every resample (row weights counts_BR), started from the optimum x_P, and which
  refits showed several minima.

  Small studies can have resamples whose objective has several local minima, where refits from
  the same start reach different ones by different paths, or none reaches the lowest. So refits
  also take a second path (`_two_paths`), and every refit of a study of up to
  fit_stages.SCREENED_MAX_ROWS rows also runs from the fit_stages.SCREENED_STARTS starts lowest in
  its own objective (`_screened`). Each refit whose second path found a lower objective (or that
  did not converge) is settled by restarts from thinned starts. Refits that still have not
  converged are failed.
  """
  xp, n = engine.xp, counts_BR.shape[0]
  at = fit_stages.whiten(p, x_P[None], xp.ones((1, p.n_rows)), solver, engine)
  ends = fit_stages.descend(p, xp.broadcast_to(x_P, (n, x_P.size)), counts_BR, solver,
                        engine.shown("bootstrap" if progress else None),
                        Coordinates(at.origin[0], at.basis[0]))
  ends = fit_stages.settle(p, ends, counts_BR, solver, engine)
  ends, paths_differ_B = _two_paths(p, ends, x_P, counts_BR, solver, engine)
  screened_lower_B = xp.zeros(n, bool)
  if p.n_rows <= fit_stages.SCREENED_MAX_ROWS:
    ends, screened_lower_B = _screened(p, ends, counts_BR, solver, engine)
  unsettled_B = paths_differ_B | ~ends.converged_S
  ends = _restart_unsettled(p, ends, counts_BR, unsettled_B, solver, engine)
  return ends, unsettled_B | screened_lower_B


def bootstrap(fit: FitResult | Estimate, resampling: Resampling, solver: Solver = Solver(), *,
              progress: bool = False) -> Bootstrap:
  """Refits of `resampling.n` resamples of the fit's rows (or groups), each started from its
  optimum, by `refit_resamples`. A host FitResult gives numpy results (a progress bar if
  `progress`); an Estimate (inside jit or vmap) gives arrays."""
  traced = isinstance(fit, Estimate)
  engine = fit_stages.TRACED if traced else fit_stages.HOST
  xp, p = engine.xp, fit.problem
  with contextlib.nullcontext() if traced else jax.enable_x64(True):
    counts_BR = resampling.counts(p.n_rows)
    if traced:
      counts_BR = counts_BR * jax.lax.stop_gradient(fit.weights_R)
      x_P = jax.lax.stop_gradient(jnp.stack([fit.params[k] for k in p.names]))
    else:
      counts_BR, x_P = np.asarray(counts_BR), np.array([fit.params[k] for k in p.names])
    ends, multimodal_B = refit_resamples(p, x_P, counts_BR, solver, engine, progress)
    natural = fit_stages.natural_samples(p, ends, xp)
    if "alpha" in natural and "beta" in natural:
      natural.update(derived(natural))
    se, ci95 = fit_stages.interval_summary(natural, xp)
  if traced:
    return Bootstrap(natural, ends.converged_S, multimodal_B, se, ci95)
  return Bootstrap(natural, np.asarray(ends.converged_S), np.asarray(multimodal_B),
                   {k: float(v) for k, v in se.items()},
                   {k: tuple(map(float, v)) for k, v in ci95.items()})


def gamma_test(boot: Bootstrap, gamma: float) -> dict[str, float | int | str]:
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
