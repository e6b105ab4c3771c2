"""What a study found, as typed values: the Report (report.json is its `to_json()`) and the
Analysis that also holds the tables and fits its plots draw. famjax.analysis.study_analysis makes
them; render and plots write them."""

from __future__ import annotations

import dataclasses

import pandas as pd

from famjax.analysis.gamma_grid import GammaGrid
from famjax.analysis.measured_leverage import LeverageAtOptimum, MeasuredLeverage, optional
from famjax.analysis.placements import Placements
from famjax.scaling.compare import Comparison
from famjax.scaling.fitted_law import FittedLaw
from famjax.study.config import AnalysisConfig


def _json(value):
  """A report value as JSON-ready data: a fitted law as its summary, dataclasses as dicts
  (optional fields left out when None), tuples as lists."""
  if isinstance(value, (FittedLaw, Comparison)):
    return value.summary()
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
  flops_per_token: str  # "6N", or "runs" (the study's rule, fitted per G: `flops_rule`)
  compute_optimal: list[ComputeOptimal]
  leverage: list[LawLeverage] | None = optional()  # None: no G >= 2 in the study
  # the runs' rule {G: [log c, p, max relative error]} of k = c N^p, when flops_per_token="runs"
  flops_rule: dict | None = optional()


@dataclasses.dataclass(frozen=True)
class Extrapolation:
  """The familial law refitted without the largest budget, predicting it (or why not run)."""
  skipped: str | None = optional()
  held_out_budget: float | None = optional()
  n_fit_rows: int | None = optional()
  n_held_out: int | None = optional()
  params: dict | None = optional()
  mean_abs_relative_error: float | None = optional()
  max_abs_relative_error: float | None = optional()
  mean_relative_error: float | None = optional()


@dataclasses.dataclass(frozen=True)
class ValidationNoise:
  """How precisely one run's validation loss is measured: from the gap between the mean losses
  of the two halves of its validation batches (a, b), se(loss) = rms(a - b) / 2 if the halves'
  errors are independent."""
  n_exits: int  # run exits with both halves recorded
  relative_se: float  # rms((a - b) / loss) / 2
  largest_relative_gap: float  # max |a - b| / loss


@dataclasses.dataclass(frozen=True)
class Report:
  """What a study found; `to_json()` is report.json."""
  options: AnalysisConfig
  runs: Runs
  laws: dict[str, FittedLaw]  # each law's fit (report.json: its summary(), as fit.json)
  skipped_laws: dict[str, str]  # law -> why it was not fitted
  edges: list[Edge]
  measured_leverage: list[MeasuredLeverage]
  extrapolation: Extrapolation
  from_law: FromLaw | None = optional()
  plan: dict | None = optional()  # plan.json's runs, drops and notes, with the study's context
  # the familial law's exponents under non-embedding and total N: {count: {name: {estimate,
  # ci95}}}
  param_counts: dict | None = optional()
  regime: list[Regime] | None = optional()  # per G, from the plan
  gamma_grid: GammaGrid | None = optional()  # gamma without the law (its runs)
  # measured EL per leverage point of the family nearest the fitted N*(C), over seeds
  leverage_at_optimum: list[LeverageAtOptimum] | None = optional()
  # the familial laws (study.compare_laws) ranked by held-out error on the familial rows
  law_comparison: Comparison | None = optional()
  placements: Placements | None = optional()  # exits decoupled from G (study.placements)
  validation_noise: ValidationNoise | None = optional()  # None: records without halves

  @property
  def has_isoflop_runs(self) -> bool:
    """False for a study of grid or placements alone (study.budgets = ()): no law to fit."""
    return bool(self.edges)

  def to_json(self) -> dict:
    out = _json(self)
    out["options"] = _options_json(self.options, self.from_law)
    return out


def _options_json(config: AnalysisConfig, from_law: FromLaw | None) -> dict:
  """report.json's `options` under the keys it has always had (loss, n_bootstrap, seed, and
  law_flops as the runs' rule, or None for 6N), so that readers of earlier reports read this one."""
  rule = from_law.flops_rule if from_law is not None else None
  return {"loss": config.fit_loss, "param_count": config.param_count,
          "n_bootstrap": config.bootstrap, "grid_every": config.grid_every,
          "seed": config.bootstrap_seed,
          "leverage_granularities": list(config.leverage_granularities),
          "law_flops": rule if config.law_flops == "runs" else None}


@dataclasses.dataclass
class Analysis:
  """The report and the tables and fits its plots draw."""
  report: Report
  rows: dict[str, pd.DataFrame]
  fits: dict[str, FittedLaw]
  frame: pd.DataFrame
  extrapolation_rows: pd.DataFrame | None = None
