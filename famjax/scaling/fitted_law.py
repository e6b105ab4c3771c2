"""A law fitted to data with its bootstrap and tests (FittedLaw), its JSON summary (what
`famjax fit` writes as fit.json and the IsoFLOP study's report.json holds per law), and the
table it prints."""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from famjax.scaling import bootstrap, fitting, laws

ORDER = ("E", "A", "B", "alpha", "beta", "gamma", "gamma_slope", "alpha_b", "beta_b", "a_opt",
         "b_opt")


TERM_FLOOR = 1e-4  # a term below this share of the loss at every row has run to zero
EXPONENT_FLOOR = 1e-3  # an exponent below this makes its term a constant, merged with E


def boundaries(law: laws.Law, params: Mapping, data: Mapping) -> dict[str, str]:
  """Parameters of a fit that have run to the edge of what the data identify, with the reason:
  E -> 0 (the budgets never approach the loss floor), a term A/N^alpha or B/D^beta that is
  negligible at every row (its coefficient and exponent are then unidentified), or an exponent
  -> 0 (its term is a constant, inseparable from E)."""
  natural = laws.to_natural_params(params)
  if not {"E", "A", "B", "alpha", "beta"} <= set(natural):
    return {}
  loss = np.asarray(data["loss"], np.float64)
  out = {}
  if natural["E"] < TERM_FLOOR * loss.min():
    out["E"] = "E -> 0: the data never approach the loss floor"
  for coef, exponent, column in (("A", "alpha", "N"), ("B", "beta", "D")):
    term = natural[coef] / np.asarray(data[column], np.float64) ** natural[exponent]
    if np.max(term / loss) < TERM_FLOOR:
      reason = f"{coef}/{column}^{exponent} is negligible at every row"
      out[coef] = out[exponent] = reason
    elif natural[exponent] < EXPONENT_FLOOR:
      reason = f"{exponent} -> 0: {coef}/{column}^{exponent} is a constant, inseparable from E"
      out[coef] = out[exponent] = out.setdefault("E", reason)
  if "alpha" in out or "beta" in out:
    out["a_opt"] = out["b_opt"] = "depends on an unidentified exponent"
  return out


class Grouping(NamedTuple):
  """What a bootstrap resamples: `name` (e.g. "runs") and each row's group label, or None when
  every row is a group of its own."""
  name: str
  labels: Sequence | None = None


@dataclasses.dataclass(frozen=True)
class FittedLaw:
  """A law's fit, its bootstrap and what follows from them, typed; `summary()` is its JSON."""
  result: fitting.FitResult
  boot: bootstrap.Bootstrap | None
  boundary: dict[str, str]  # parameter -> why it is unidentified (`boundaries`)
  gamma_test: dict | None  # bootstrap.gamma_test, for the familial law with refits
  resampled: str  # "rows", or the Grouping's name
  seconds: float

  def summary(self) -> dict:
    """JSON-ready: law, params, derived, objective, n_rows, starts, bootstrap, ... (fit.json,
    and each law's entry of an IsoFLOP study's report.json)."""
    result, edge, boot = self.result, self.boundary, self.boot
    natural = laws.to_natural_params(result.params)
    out = {"law": result.law.name, "params": natural,
           "derived": bootstrap.derived(natural) if {"alpha", "beta"} <= set(natural) else {},
           "objective": result.objective, "n_rows": result.n_rows,
           "converged": result.converged, "boundary": edge,
           "starts": {"n": int(result.start_objective.size),
                      "converged": int(result.start_converged.sum())}}
    if boot is not None:
      out["bootstrap"] = {"n": boot.n,
                          "se": {k: None if k in edge else v for k, v in boot.se.items()},
                          "ci95": {k: None if k in edge else list(v) for k, v in boot.ci95.items()},
                          "converged": boot.converged_share, "failed": boot.failed,
                          "multimodal": boot.multimodal, "resampled": self.resampled}
    if self.gamma_test is not None:
      out["gamma_test"] = self.gamma_test
    out["seconds"] = self.seconds
    return out


def fit_law(law: laws.Law, data: Mapping, *, n_bootstrap: int = 4000, seed: int = 0,
            grouping: Grouping | None = None, delta: float = fitting.DEFAULT_DELTA,
            starts: Mapping | None = None, progress: bool = False) -> FittedLaw:
  """Grid fit, bootstrap refits (of rows, or of whole groups) and, for the familial law with
  refits, the one-sided tests of gamma > 0."""
  start = time.perf_counter()
  result = fitting.fit(fitting.Problem.of(law, data, delta=delta), starts=starts, progress=progress)
  edge = boundaries(law, result.params, data)
  if not result.converged:
    warnings.warn(f"{law.name} law: no start converged; the estimates are the lowest "
                  "objective reached, not an optimum", stacklevel=2)
  for name, why in edge.items():
    warnings.warn(f"{law.name} law: {name} is at a boundary ({why}); its interval is "
                  "reported as unidentified", stacklevel=2)
  boot = None
  if n_bootstrap:
    resampling = fitting.Resampling(n_bootstrap, seed,
                                    None if grouping is None else grouping.labels)
    boot = bootstrap.bootstrap(result, resampling, progress=progress)
    if boot.failed:
      warnings.warn(f"{law.name} law: {boot.failed} of {boot.n} bootstrap refits did not "
                    "converge after every retry; they are left out of the SEs and intervals",
                    stacklevel=2)
  test = None
  if law is laws.FAMILIAL and boot is not None and "gamma" in result.params:
    test = bootstrap.gamma_test(boot, result.params["gamma"])
  return FittedLaw(result, boot, edge, test, grouping.name if grouping else "rows",
                   time.perf_counter() - start)


def law_table(record: dict) -> str:
  """The estimates with SE and 95% interval, and the gamma tests, as printed text."""
  lines = [f"{record['law']} law, {record['n_rows']} rows, objective {record['objective']:.10g}",
           f"{'param':>8} {'estimate':>12} {'SE':>10} {'95% CI':>26}"]
  estimates = {**record["params"], **record["derived"]}
  boot = record.get("bootstrap")
  edge = record.get("boundary", {})
  for name in [k for k in ORDER if k in estimates]:
    value = estimates[name]
    if name in edge:
      lines.append(f"{name:>8} {value:>12.5g} {'-':>10} {'unidentified (boundary)':>26}")
    elif boot:
      lo, hi = boot["ci95"][name]
      lines.append(f"{name:>8} {value:>12.5g} {boot['se'][name]:>10.4g} "
                   f"{f'[{lo:.5g}, {hi:.5g}]':>26}")
    else:
      lines.append(f"{name:>8} {value:>12.5g}")
  for name, why in edge.items():
    lines.append(f"boundary: {name}: {why}")
  if boot and boot.get("failed"):
    lines.append(f"warning: {boot['failed']} of {boot['n']} bootstrap refits failed to converge "
                 "and are left out of the SEs and intervals")
  if not record.get("converged", True):
    lines.append("warning: no start converged; the estimates are not an optimum")
  if "gamma_test" in record:
    lines.append(gamma_test_line(record["gamma_test"]))
  return "\n".join(lines)


def gamma_test_line(test: Mapping) -> str:
  """The one-sided tests of gamma > 0 in words (p = 0 printed as p < 1/n)."""
  n = test["n_refits"]
  p = lambda v: f"p < {1 / n:.2g}" if v == 0 else f"p = {v:.3g}"
  return (f"Is gamma > 0 (one-sided, {n} bootstrap refits)? percentile {p(test['p_percentile'])}"
          f" ({round(test['p_percentile'] * n)} refits <= 0), basic {p(test['p_basic'])}")
