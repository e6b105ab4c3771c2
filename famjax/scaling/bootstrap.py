"""Bootstrap refits (rows or whole groups resampled), all in one jitted vmap of L-BFGS lanes
started from the optimum, in coordinates whitened by the full-data Hessian there (fit.whitened).

Standard errors, 95% percentile intervals, the same for derived quantities, and for the familial
law two tests of gamma > 0.
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


def bootstrap(law: Law, data: Mapping, result: fitlib.FitResult, *, n: int = 4000, seed: int = 0,
              groups: Sequence | None = None, delta: float = fitlib.DEFAULT_DELTA,
              maxiter: int = fitlib.DEFAULT_MAXITER, tol: float = fitlib.DEFAULT_TOL,
              lanes: int = fitlib.DEFAULT_LANES, progress: bool = False) -> BootstrapResult:
  """Refits on n resamples, each started from the full-data optimum `result`."""
  with jax.enable_x64(True):
    data = fitlib.as_data(data)
    counts_BR = resample_counts(int(data["loss"].shape[0]), n, seed, groups)
    fixed = {k: jnp.float64(v) for k, v in result.fixed.items()}
    inits = {k: np.full(n, v) for k, v in result.params.items()}
    coordinates = fitlib.whitened(law, result.params, data, delta=delta, fixed=fixed, lanes=lanes)
    params_B, _, converged_B = fitlib.solve_batch(law, inits, data, counts_BR, fixed,
                                                  coordinates=coordinates, delta=delta,
                                                  maxiter=maxiter, tol=tol, lanes=lanes,
                                                  progress=progress, desc="bootstrap")
  natural = to_natural_params(params_B)
  natural = {k: np.asarray(v) for k, v in natural.items()}
  if "alpha" in natural and "beta" in natural:
    natural.update(derived(natural))
  se = {k: float(np.std(v, ddof=1)) for k, v in natural.items()}
  ci = {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in natural.items()}
  return BootstrapResult(n=n, samples=natural, se=se, ci95=ci,
                         converged=float(np.mean(converged_B)))


def gamma_tests(data: Mapping, result: fitlib.FitResult, boot: BootstrapResult | None = None,
                **fit_kwargs) -> dict[str, float]:
  """Is gamma > 0?  Bootstrap p = share of refits with gamma <= 0; likelihood-ratio test of the
  familial law against gamma = 0, treating log residuals as Gaussian: n log(SSR_0 / SSR_1) ~ chi2(1).
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
    out["bootstrap_p"] = float(np.mean(boot.samples["gamma"] <= 0.0))
  return out
