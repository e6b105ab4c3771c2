"""A law fitted to data with its bootstrap and tests, as the JSON record `experiments.fit` writes
(and the IsoFLOP study's report holds per law), and the table it prints."""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Sequence

import numpy as np

from famjax.scaling import bootstrap as bootlib
from famjax.scaling import fit as fitlib
from famjax.scaling import laws

ORDER = ("E", "A", "B", "alpha", "beta", "gamma", "alpha_b", "beta_b", "a_opt", "b_opt")


@dataclasses.dataclass(frozen=True)
class FittedLaw:
  record: dict  # JSON-ready: law, params, derived, objective, n_rows, starts, bootstrap, ...
  result: fitlib.FitResult
  boot: bootlib.BootstrapResult | None


def fit_law(law: laws.Law, data: Mapping, *, n_bootstrap: int = 4000, seed: int = 0,
            groups: Sequence | None = None, resampled: str = "rows",
            delta: float = fitlib.DEFAULT_DELTA, grid: Mapping | None = None,
            init: Mapping | None = None, progress: bool = False) -> FittedLaw:
  """Grid fit, bootstrap refits (whole groups if given) and, for the familial law, the tests of
  gamma > 0. `init` (log parameters, e.g. an earlier fit's) is added to the grid's starts."""
  start = time.perf_counter()
  grid = dict(grid or law.grid())
  if init is not None:
    grid = {k: np.append(v, init[k]) for k, v in grid.items()}
  result = fitlib.fit(law, data, delta=delta, grid=grid, progress=progress)
  natural = laws.to_natural_params(result.params)
  derived = bootlib.derived(natural) if {"alpha", "beta"} <= set(natural) else {}
  record = {"law": law.name, "params": natural, "derived": derived,
            "objective": result.objective, "n_rows": result.n_rows,
            "starts": {"n": int(result.start_objective.size),
                       "converged": int(result.start_converged.sum())}}
  boot = None
  if n_bootstrap:
    boot = bootlib.bootstrap(law, data, result, n=n_bootstrap, seed=seed, groups=groups,
                             delta=delta, progress=progress)
    record["bootstrap"] = {"n": boot.n, "se": boot.se,
                           "ci95": {k: list(v) for k, v in boot.ci95.items()},
                           "converged": boot.converged, "resampled": resampled}
  if law is laws.FAMILIAL:
    record["gamma_test"] = bootlib.gamma_tests(data, result, boot, delta=delta, grid=grid)
  record["seconds"] = time.perf_counter() - start
  return FittedLaw(record, result, boot)


def table(record: dict) -> str:
  """The estimates with SE and 95% interval, and the gamma tests, as printed text."""
  lines = [f"{record['law']} law, {record['n_rows']} rows, objective {record['objective']:.10g}",
           f"{'param':>8} {'estimate':>12} {'SE':>10} {'95% CI':>26}"]
  estimates = {**record["params"], **record["derived"]}
  boot = record.get("bootstrap")
  for name in [k for k in ORDER if k in estimates]:
    value = estimates[name]
    if boot:
      lo, hi = boot["ci95"][name]
      lines.append(f"{name:>8} {value:>12.5g} {boot['se'][name]:>10.4g} "
                   f"{f'[{lo:.5g}, {hi:.5g}]':>26}")
    else:
      lines.append(f"{name:>8} {value:>12.5g}")
  if "gamma_test" in record:
    t = record["gamma_test"]
    lines.append(f"gamma > 0?  likelihood-ratio p = {t['lrt_p']:.3g}"
                 + (f", bootstrap p = {t['bootstrap_p']:.3g}" if "bootstrap_p" in t else ""))
  return "\n".join(lines)
