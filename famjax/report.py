"""The IsoFLOP study's analysis: the unified familial law, the branch law and a dense-only
Chinchilla law, each with bootstrap 95% intervals (whole runs resampled); the tests of gamma > 0;
Efficiency Leverage from the fitted law and measured; compute-optimal N*(C) per G; an
extrapolation check; written as STUDY/report.json, STUDY/report.md and PNG plots.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from famjax import gamma_grid, leverage_runs, results
from famjax.isoflop import ISOFLOP, Plan
from famjax.scaling import fit as fitlib
from famjax.scaling import io, laws, leverage, record


@dataclasses.dataclass(frozen=True)
class Options:
  loss: str = "val"  # "val" or "train"
  param_count: str = "non_embedding"  # N of the laws
  n_bootstrap: int = 1000
  grid_every: int = 1
  seed: int = 0
  leverage_granularities: tuple[int, ...] = ()  # G of the law's EL table; () = the study's G >= 2
  # FLOPs per token of the law's EL and N*(C): {G: (log c, p, max error)} for k = c N^p (the
  # runs' own rule, isoflop.flops_rule), or None for 6N
  law_flops: dict | None = None


_optional = leverage_runs.optional


def _json(value):
  """A report value as JSON-ready data: dataclasses as dicts (optional fields left out when
  None), tuples as lists."""
  if dataclasses.is_dataclass(value):
    return {f.name: _json(getattr(value, f.name)) for f in dataclasses.fields(value)
            if not (f.metadata.get("optional") and getattr(value, f.name) is None)}
  if isinstance(value, dict):
    return {k: _json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json(v) for v in value]
  return value


@dataclasses.dataclass(frozen=True)
class Runs:
  planned: int
  finished: int
  failed: dict[str, str]  # run id -> error
  missing: list[str]  # planned, no records yet
  dropped: list[list[str]]  # [run id, why] at planning


@dataclasses.dataclass(frozen=True)
class Edge:
  """At (C, G): the size with the lowest loss (mean over seeds), and whether it is the smallest
  or the largest size trained (a valley the sizes did not bracket) or interior."""
  C: float
  G: int
  best_N: float
  best_loss: float
  minimum_at: str
  n_sizes: int


@dataclasses.dataclass(frozen=True)
class Regime:
  """The planned families of one G: the range (min, max) of the share of their parameters in
  the embedding and exit heads, and of their FLOPs per token over a dense model of their shape."""
  G: int
  n_families: int
  outside_backbone_share: tuple[float, float]
  flops_over_dense: tuple[float, float]


def _regime(plan: Plan | None) -> list[Regime] | None:
  if plan is None:
    return None
  out = []
  for g in sorted({r.granularity for r in plan.runs if r.kind == ISOFLOP}):
    accs = [r.accounting for r in plan.runs if r.kind == ISOFLOP and r.granularity == g]
    span = lambda values: (float(min(values)), float(max(values)))
    out.append(Regime(g, len(accs), span([a.outside_backbone_share for a in accs]),
                      span([a.flops_over_dense for a in accs])))
  return out


@dataclasses.dataclass(frozen=True)
class _AtBudget:
  """What the fitted law predicts at budget C for G exits."""
  C: float
  G: int


@dataclasses.dataclass(frozen=True)
class LawLeverage(_AtBudget):
  EL: float
  ci95: list[float] | None  # bootstrap 95% interval (None without a bootstrap)


@dataclasses.dataclass(frozen=True)
class ComputeOptimal(_AtBudget):
  N_opt: float
  D_opt: float
  ci95: list[float] | None


@dataclasses.dataclass(frozen=True)
class FromLaw:
  """EL(C, G) and N*(C) per G from the familial fit, C = k(N, G) D."""
  budgets: list[float]
  flops_per_token: str  # "6N", or "runs" (the study's rule, fitted per G: Options.law_flops)
  compute_optimal: list[ComputeOptimal]
  leverage: list[LawLeverage] | None = _optional()  # None: no G >= 2 in the study


@dataclasses.dataclass(frozen=True)
class Extrapolation:
  """The familial law refitted without the largest budget, predicting it (or why not run)."""
  skipped: str | None = _optional()
  held_out_budget: float | None = _optional()
  n_fit_rows: int | None = _optional()
  n_held_out: int | None = _optional()
  params: dict | None = _optional()
  mean_abs_relative_error: float | None = _optional()
  max_abs_relative_error: float | None = _optional()
  mean_relative_error: float | None = _optional()


@dataclasses.dataclass(frozen=True)
class Report:
  """What a study found; `to_json()` is report.json."""
  options: Options
  runs: Runs
  laws: dict[str, dict]  # each law's fit record, as fit.json (record.fit_law)
  skipped_laws: dict[str, str]  # law -> why it was not fitted
  edges: list[Edge]
  measured_leverage: list[leverage_runs.MeasuredLeverage]
  extrapolation: Extrapolation
  from_law: FromLaw | None = _optional()
  plan: dict | None = _optional()  # plan.json's runs, drops and notes, with the study's context
  # the familial law's exponents under non-embedding and total N: {count: {name: {estimate,
  # ci95}}}
  param_counts: dict | None = _optional()
  regime: list[Regime] | None = _optional()  # per G, from the plan
  gamma_grid: gamma_grid.GammaGrid | None = _optional()  # gamma without the law (its runs)
  # measured EL per leverage point of the family nearest the fitted N*(C), over seeds
  leverage_at_optimum: list[leverage_runs.LeverageAtOptimum] | None = _optional()

  def to_json(self) -> dict:
    return _json(self)


@dataclasses.dataclass
class Analysis:
  """The report and the tables and fits its plots draw."""
  report: Report
  rows: dict[str, pd.DataFrame]
  fits: dict[str, record.FittedLaw]
  frame: pd.DataFrame
  extrapolation_rows: pd.DataFrame | None = None


def _data(rows: pd.DataFrame, law: laws.Law, source: str) -> dict[str, np.ndarray]:
  return io.validate(rows, law, source=source)


def _fit_laws(rows, options, progress) -> tuple[dict, dict]:
  fits, skipped = {}, {}
  for name, law in laws.LAWS.items():
    try:
      data = _data(rows[name], law, f"the study's {name} rows")
    except ValueError as e:
      skipped[name] = str(e)
      continue
    # a familial or Chinchilla row is a run; a branch run has a row per exit
    grouping = record.Grouping("runs", rows[name]["run_id"].to_numpy() if name == "branch"
                               else None)
    fits[name] = record.fit_law(law, data, n_bootstrap=options.n_bootstrap, seed=options.seed,
                                grouping=grouping, grid=law.grid(options.grid_every),
                                progress=progress)
  return fits, skipped


def _by_param_count(frame: pd.DataFrame, fits: dict, options) -> dict[str, dict] | None:
  """gamma, alpha and beta of the familial law under both N definitions (the study's and the
  other one, refitted with the same bootstrap), each as {"estimate", "ci95"}."""
  if "familial" not in fits:
    return None
  other = "total" if options.param_count == "non_embedding" else "non_embedding"
  try:
    rows = results.law_rows(frame, "familial", loss=options.loss, param_count=other)
    data = _data(rows, laws.FAMILIAL, f"the study's familial rows with N = {other}")
  except ValueError:
    return None
  refit = record.fit_law(laws.FAMILIAL, data, n_bootstrap=options.n_bootstrap, seed=options.seed,
                         grid=laws.FAMILIAL.grid(options.grid_every))

  def summary(law_record: dict) -> dict:
    ci = (law_record.get("bootstrap") or {}).get("ci95", {})
    return {k: {"estimate": law_record["params"][k], "ci95": ci.get(k)}
            for k in ("gamma", "alpha", "beta")}

  return {options.param_count: summary(fits["familial"].record), other: summary(refit.record)}


def _log_samples(fitted: record.FittedLaw) -> dict[str, np.ndarray] | None:
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


def _leverage_from_law(fitted, budgets, granularities, options: Options) -> FromLaw:
  """EL(C, G) for options.leverage_granularities (default: the study's G >= 2) and N*(C) per
  trained G from the familial fit, with C = k(N, G) D under options.law_flops (6N if None)."""
  params, samples = fitted.result.params, _log_samples(fitted)
  el_gs = list(options.leverage_granularities) or [g for g in granularities if g >= 2]
  rule, label = leverage.six_n, "6N"
  if options.law_flops is not None:
    known = {int(g): (c, p) for g, (c, p, _) in options.law_flops.items()}
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
  return FromLaw(list(budgets), label, optimal, law_leverage)


def _extrapolation(rows: pd.DataFrame, options) -> tuple[Extrapolation, pd.DataFrame | None]:
  """Refit the familial law without the largest budget; errors predicting that budget's runs."""
  budgets = np.sort(rows["C"].unique())
  if len(budgets) < 3:
    return Extrapolation(skipped="needs at least 3 budgets"), None
  held_out = rows["C"] == budgets[-1]
  try:
    data = _data(rows[~held_out], laws.FAMILIAL, "the rows below the largest budget")
  except ValueError as e:
    return Extrapolation(skipped=str(e)), None
  result = fitlib.fit(laws.FAMILIAL, data, grid=laws.FAMILIAL.grid(options.grid_every))
  test = rows[held_out]
  with jax.enable_x64(True):
    predicted = np.asarray(laws.loss(laws.FAMILIAL, result.params, fitlib.as_data(
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


def _runs(frame: pd.DataFrame, plan: Plan | None) -> Runs:
  by_run = frame.groupby("run_id").agg(status=("status", "first"), error=("error", "first"))
  planned = [r.run_id for r in plan.runs] if plan else list(by_run.index)
  failed = {i: e for i, (s, e) in by_run.iterrows() if s == results.FAILED}
  return Runs(len(planned), int((by_run["status"] == results.OK).sum()), failed,
              sorted(set(planned) - set(by_run.index)),
              [list(d) for d in plan.dropped] if plan else [])


def analyze(frame: pd.DataFrame, options: Options = Options(), plan: Plan | None = None,
            context: dict | None = None, progress: bool = False) -> Analysis:
  """Fits, leverage, extrapolation and edge checks of a study's collected records (`frame`,
  results.collect), against the plan they were trained under; `context` (e.g. the corpus
  fingerprint and the study config) is recorded beside the plan."""
  rows = {name: results.law_rows(frame, name, loss=options.loss,
                                 param_count=options.param_count) for name in laws.LAWS}
  fits, skipped = _fit_laws(rows, options, progress)
  param_counts = _by_param_count(frame, fits, options)
  familial = fits.get("familial")
  from_law = None
  if familial is not None:
    budgets = sorted(rows["familial"]["C"].unique().tolist())
    granularities = sorted(int(g) for g in rows["familial"]["G"].unique())
    from_law = _leverage_from_law(familial, budgets, granularities, options)
  extrapolation, extrapolation_rows = _extrapolation(rows["familial"], options)
  law_interval = None if familial is None else (
      lambda fn: _with_interval(fn, familial.result.params, _log_samples(familial)))
  measured = leverage_runs.measured(frame, options, law_interval)
  report = Report(options=options, runs=_runs(frame, plan),
                  laws={name: f.record for name, f in fits.items()}, skipped_laws=skipped,
                  edges=_edges(rows["familial"]),
                  measured_leverage=measured,
                  leverage_at_optimum=leverage_runs.at_optimum(
                      measured, from_law.compute_optimal) if from_law else None,
                  extrapolation=extrapolation, from_law=from_law,
                  plan={**plan.describe(), **(context or {})} if plan else None,
                  regime=_regime(plan), param_counts=param_counts,
                  gamma_grid=gamma_grid.analyze(frame, options.loss))
  return Analysis(report, rows, fits, frame, extrapolation_rows)


class LiveFit:
  """Refits the familial law each time a run finishes, from the previous estimate and a thin
  grid (rows are padded to size buckets, so a growing study compiles a few programs, not one per
  run), and prints the current estimates. The first call reads the study's records from disk
  (runs finished before this sweep); later calls add the records the sweep passes."""

  def __init__(self, study_dir, options: Options, fingerprint: str | None = None,
               grid_every: int = 50):
    self.study_dir, self.options, self.fingerprint = study_dir, options, fingerprint
    self.grid = laws.FAMILIAL.grid(grid_every)
    self.params: dict | None = None
    self.records: list[dict] | None = None

  def _add(self, spec, records) -> None:
    if self.records is None or spec is None or records is None:
      self.records = results.collect(self.study_dir, self.fingerprint).to_dict("records")
    else:
      self.records = [r for r in self.records if r["run_id"] != spec.run_id] + list(records)

  def __call__(self, spec=None, records=None) -> str | None:
    """spec and records: a run the sweep has just finished (None: reread the study)."""
    if spec is not None and spec.kind != ISOFLOP:
      return None  # the law's rows did not change
    self._add(spec, records)
    frame = pd.DataFrame(self.records, columns=None if self.records else list(results.REQUIRED))
    rows = results.law_rows(frame, "familial", loss=self.options.loss,
                            param_count=self.options.param_count)
    try:
      data = _data(rows, laws.FAMILIAL, "the runs so far")
    except ValueError:
      return None  # not identifiable yet
    grid = self.grid
    if self.params is not None:
      grid = {k: np.append(v, self.params[k]) for k, v in grid.items()}
    result = fitlib.fit(laws.FAMILIAL, data, grid=grid)
    self.params = result.params
    natural = laws.to_natural_params(result.params)
    line = (f"live fit over {len(rows)} runs: gamma={natural['gamma']:.4f} "
            f"alpha={natural['alpha']:.3f} beta={natural['beta']:.3f} E={natural['E']:.3g}")
    tqdm.write(line)
    return line
