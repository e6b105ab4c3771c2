"""The IsoFLOP study's analysis: the unified familial law, the branch law and a dense-only
Chinchilla law, each with bootstrap 95% intervals (whole runs resampled); the familial laws
compared by held-out error; the tests of gamma > 0;
Efficiency Leverage from the fitted law and measured; compute-optimal N*(C) per G; an
extrapolation check. Records in, a typed Report out (famjax.analysis.report).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from famjax.analysis import gamma_grid, measured_leverage, placements, timing
from famjax.analysis.report import (
  Analysis,
  ComputeOptimal,
  Edge,
  Extrapolation,
  FromLaw,
  LawLeverage,
  Regime,
  Report,
  Runs,
  ValidationNoise,
)
from famjax.scaling import compare, fit_data, fitted_law, fitting, laws, leverage
from famjax.study import records
from famjax.study.config import AnalysisConfig
from famjax.study.isoflop import ISOFLOP, StudyPlan


def _regime(plan: StudyPlan | None) -> list[Regime] | None:
  if plan is None:
    return None
  out = []
  for g in sorted({r.granularity for r in plan.runs if r.kind == ISOFLOP}):
    accs = [r.accounting for r in plan.runs if r.kind == ISOFLOP and r.granularity == g]
    span = lambda values: (float(min(values)), float(max(values)))
    out.append(Regime(g, len(accs), span([a.outside_backbone_share for a in accs]),
                      span([a.flops_over_dense for a in accs])))
  return out


def law_data(rows: pd.DataFrame, law: laws.Law, source: str) -> dict[str, np.ndarray]:
  return fit_data.validate(rows, law, source=source)


def _fit_laws(rows, config, progress) -> tuple[dict, dict]:
  fits, skipped = {}, {}
  for name, law in laws.LAWS.items():
    try:
      data = law_data(rows[name], law, f"the study's {name} rows")
    except ValueError as e:
      skipped[name] = str(e)
      continue
    # a familial or Chinchilla row is a run; a branch run has a row per exit
    grouping = fitted_law.Grouping("runs", rows[name]["run_id"].to_numpy() if name == "branch"
                                   else None)
    with timing.section(f"{name} fit + bootstrap"):
      fits[name] = fitted_law.fit_law(law, data, n_bootstrap=config.bootstrap,
                                      seed=config.bootstrap_seed, grouping=grouping,
                                      starts=law.starts(config.grid_every), progress=progress)
  return fits, skipped


def _comparison(rows: pd.DataFrame, config: AnalysisConfig, progress: bool,
                familial: fitted_law.FittedLaw | None) -> compare.Comparison | None:
  """config.compare_laws ranked on the familial rows (None when there are none to rank, or the
  rows cannot identify one of them). The familial fit is the "paper" candidate's: the same law
  on the same rows, bootstrap and starts."""
  if not config.compare_laws:
    return None
  candidates = {name: laws.CANDIDATES[name] for name in config.compare_laws}
  try:
    columns = compare.columns_of(rows, candidates, "the study's familial rows")
  except ValueError:
    return None
  fitted = {"paper": familial} if familial is not None and "paper" in candidates else None
  return compare.compare(candidates, columns,
                         n_bootstrap=config.bootstrap, seed=config.bootstrap_seed,
                         starts_every=config.grid_every, progress=progress, fitted=fitted)


def _by_param_count(frame: pd.DataFrame, fits: dict, config) -> dict[str, dict] | None:
  """gamma, alpha and beta of the familial law under both N definitions (the study's and the
  other one, refitted with the same bootstrap), each as {"estimate", "ci95"}."""
  if "familial" not in fits:
    return None
  other = "total" if config.param_count == "non_embedding" else "non_embedding"
  try:
    rows = records.law_rows(frame, "familial", loss=config.fit_loss, param_count=other)
    data = law_data(rows, laws.FAMILIAL, f"the study's familial rows with N = {other}")
  except ValueError:
    return None
  refit = fitted_law.fit_law(laws.FAMILIAL, data, n_bootstrap=config.bootstrap,
                         seed=config.bootstrap_seed, starts=laws.FAMILIAL.starts(config.grid_every))

  def summary(law_record: dict) -> dict:
    ci = (law_record.get("bootstrap") or {}).get("ci95", {})
    return {k: {"estimate": law_record["params"][k], "ci95": ci.get(k)}
            for k in ("gamma", "alpha", "beta")}

  return {config.param_count: summary(fits["familial"].summary()),
          other: summary(refit.summary())}


def _log_samples(fitted: fitted_law.FittedLaw) -> dict[str, np.ndarray] | None:
  if fitted.boot is None:
    return None
  names = fitted.result.params
  natural = {k: v for k, v in fitted.boot.samples.items() if k in laws.to_natural_params(names)}
  return {k: np.asarray(v) for k, v in laws.to_log_params(natural).items()}


def _with_interval(fn, params: dict, samples: dict | None) -> tuple[np.ndarray, np.ndarray | None]:
  """fn(params) and, over bootstrap samples, its 95% interval (last axis: low, high)."""
  with jax.enable_x64(True):
    estimate = np.asarray(jax.jit(fn)({k: jnp.float64(v) for k, v in params.items()}))
    if samples is None:
      return estimate, None
    values = np.asarray(jax.jit(jax.vmap(fn))({k: jnp.asarray(v) for k, v in samples.items()}))
  return estimate, np.stack([np.nanpercentile(values, 2.5, axis=0),
                             np.nanpercentile(values, 97.5, axis=0)], axis=-1)


def _leverage_from_law(fitted, budgets, granularities, config: AnalysisConfig,
                       flops_rule: dict | None) -> FromLaw:
  """EL(C, G) for config.leverage_granularities (default: the study's G >= 2) and N*(C) per
  trained G from the familial fit, with C = k(N, G) D under flops_rule, the runs' own
  {G: (log c, p, max error)} of k = c N^p (famjax.study.isoflop.flops_rule; None: 6N)."""
  params, samples = fitted.result.params, _log_samples(fitted)
  el_gs = list(config.leverage_granularities) or [g for g in granularities if g >= 2]
  rule, label = leverage.six_n, "6N"
  if flops_rule is not None:
    known = {int(g): (c, p) for g, (c, p, _) in flops_rule.items()}
    rule, label = leverage.power_rule(known), "runs"
    el_gs = [g for g in el_gs if g in known and 1 in known]
    granularities = [g for g in granularities if g in known]
  law_leverage = None
  if el_gs:
    el, el_ci = _with_interval(
        lambda p: leverage.leverage_table(p, budgets, el_gs, flops_per_token=rule), params,
        samples)
    law_leverage = [LawLeverage(c, g, float(el[i, j]),
                                None if el_ci is None else el_ci[i, j].tolist())
                    for i, c in enumerate(budgets) for j, g in enumerate(el_gs)]
  optimal = []
  for g in granularities:
    n_star, n_ci = _with_interval(
        lambda p: jax.vmap(lambda c: leverage.compute_optimal(p, c, g, flops_per_token=rule)[0])(
            jnp.asarray(budgets, jnp.float64)), params, samples)
    optimal += [ComputeOptimal(c, g, float(n_star[i]), float(c / rule(n_star[i], g)),
                               None if n_ci is None else n_ci[i].tolist())
                for i, c in enumerate(budgets)]
  return FromLaw(list(budgets), label, optimal, law_leverage, flops_rule)


def _extrapolation(rows: pd.DataFrame, config) -> tuple[Extrapolation, pd.DataFrame | None]:
  """Refit the familial law without the largest budget; errors predicting that budget's runs."""
  budgets = np.sort(rows["C"].unique())
  if len(budgets) < 3:
    return Extrapolation(skipped="needs at least 3 budgets"), None
  held_out = rows["C"] == budgets[-1]
  try:
    data = law_data(rows[~held_out], laws.FAMILIAL, "the rows below the largest budget")
  except ValueError as e:
    return Extrapolation(skipped=str(e)), None
  result = fitting.fit(fitting.Problem.of(laws.FAMILIAL, data),
                      starts=laws.FAMILIAL.starts(config.grid_every))
  test = rows[held_out]
  with jax.enable_x64(True):
    predicted = np.asarray(laws.loss(laws.FAMILIAL, result.params, fitting.as_data(
        {k: test[k].to_numpy(float) for k in ("N", "D", "G")})))
  error = predicted / test["loss"].to_numpy(float) - 1
  out = rows.assign(held_out=held_out, predicted=np.nan)
  out.loc[held_out, "predicted"] = predicted
  return Extrapolation(held_out_budget=float(budgets[-1]), n_fit_rows=int((~held_out).sum()),
                       n_held_out=int(held_out.sum()),
                       params=laws.to_natural_params(result.params),
                       mean_abs_relative_error=float(np.mean(np.abs(error))),
                       max_abs_relative_error=float(np.max(np.abs(error))),
                       mean_relative_error=float(np.mean(error))), out


def _edges(rows: pd.DataFrame) -> list[Edge]:
  """Per (C, G): the size with the lowest loss (mean over seeds), and where it sits."""
  out = []
  for (c, g), curve in rows.groupby(["C", "G"]):
    by_size = curve.groupby("N")["loss"].mean().sort_index()
    if len(by_size) < 2:
      continue
    best = int(np.argmin(by_size.to_numpy()))
    where = ("smallest" if best == 0 else "largest" if best == len(by_size) - 1 else "interior")
    out.append(Edge(float(c), int(g), float(by_size.index[best]), float(by_size.iloc[best]),
                    where, len(by_size)))
  return out


def _validation_noise(frame: pd.DataFrame) -> ValidationNoise | None:
  if "val_loss_first_half" not in frame:
    return None
  ok = frame[frame["status"] == records.OK]
  halves = ok[["val_loss_first_half", "val_loss_second_half", "val_loss"]].apply(
      pd.to_numeric).dropna()
  if halves.empty:
    return None
  gap = (halves["val_loss_first_half"] - halves["val_loss_second_half"]) / halves["val_loss"]
  return ValidationNoise(len(gap), float(np.sqrt(np.mean(gap ** 2)) / 2),
                         float(np.abs(gap).max()))


def _runs(frame: pd.DataFrame, plan: StudyPlan | None) -> Runs:
  by_run = frame.groupby("run_id").agg(status=("status", "first"), error=("error", "first"))
  planned = [r.run_id for r in plan.runs] if plan else list(by_run.index)
  failed = {i: e for i, (s, e) in by_run.iterrows() if s == records.FAILED}
  return Runs(len(planned), int((by_run["status"] == records.OK).sum()), failed,
              sorted(set(planned) - set(by_run.index)),
              [list(d) for d in plan.dropped] if plan else [])


def analyze_study(frame: pd.DataFrame, config: AnalysisConfig = AnalysisConfig(),
                  plan: StudyPlan | None = None, context: dict | None = None,
                  progress: bool = False, flops_rule: dict | None = None) -> Analysis:
  """Fits, leverage, extrapolation and edge checks of a study's collected records (`frame`,
  records.collect), against the plan they were trained under; `context` (e.g. the corpus
  fingerprint and the study config) is recorded beside the plan; timing.section times each
  part."""
  with timing.section("records to rows"):
    rows = {name: records.law_rows(frame, name, loss=config.fit_loss,
                                   param_count=config.param_count) for name in laws.LAWS}
  fits, skipped = _fit_laws(rows, config, progress)
  with timing.section("familial, other N"):
    param_counts = _by_param_count(frame, fits, config)
  familial = fits.get("familial")
  from_law = None
  with timing.section("EL and N* from the law"):
    if familial is not None:
      budgets = sorted(rows["familial"]["C"].unique().tolist())
      granularities = sorted(int(g) for g in rows["familial"]["G"].unique())
      from_law = _leverage_from_law(familial, budgets, granularities, config, flops_rule)
  with timing.section("extrapolation"):
    extrapolation, extrapolation_rows = _extrapolation(rows["familial"], config)
  law_interval = None if familial is None else (
      lambda fn: _with_interval(fn, familial.result.params, _log_samples(familial)))
  with timing.section("measured EL"):
    measured = measured_leverage.measured(frame, config, law_interval)
    at_optimum = (measured_leverage.at_optimum(measured, from_law.compute_optimal)
                  if from_law else None)
  with timing.section("gamma grid"):
    grid = gamma_grid.measure_grid(frame, config.fit_loss)
  with timing.section("law comparison"):
    comparison = _comparison(rows["familial"], config, progress, familial)
  with timing.section("placements"):
    placed = placements.measure_placements(frame, config.fit_loss, max(config.bootstrap, 1000),
                                           config.bootstrap_seed)
  report = Report(options=config, runs=_runs(frame, plan),
                  laws=dict(fits), skipped_laws=skipped,
                  edges=_edges(rows["familial"]),
                  measured_leverage=measured, leverage_at_optimum=at_optimum,
                  extrapolation=extrapolation, from_law=from_law,
                  plan={**plan.describe(), **(context or {})} if plan else None,
                  regime=_regime(plan), param_counts=param_counts, gamma_grid=grid,
                  law_comparison=comparison, placements=placed,
                  validation_noise=_validation_noise(frame))
  return Analysis(report, rows, fits, frame, extrapolation_rows)
