"""Laws compared on the same rows: which predicts data it was not fitted to.

Each law is fitted to all rows (with bootstrap intervals, `fitted_law.fit_law`) and refitted once
per fold with that fold's rows weighted 0, the way bootstrap refits are made (from the full fit's
optimum, every fold at once); each fold's rows are then predicted. Folds are whole budgets
(leave one budget out: extrapolation across compute) or whole configurations (leave one (N, D, G)
out, every seed of it). Laws are ranked by the mean absolute held-out error of the first scheme
the data allow (budgets, else configurations); how sure that ranking is comes from resampling
configurations (rows of one configuration together), without refits. A penalised fit, the
Laplace AIC (see `laplace_aic`), is reported beside it.

Shape letters: R rows, B resamples, L laws.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from famjax.scaling import bootstrap, fit_data, fitted_law, fitting, laws
from famjax.scaling.solver import fit_stages

SCHEMES = ("budget", "configuration")
N_RESAMPLES = 2000  # resamples of configurations behind the ranking's confidence


class HeldOut(NamedTuple):
  """Every row predicted by the law fitted without the row's fold."""
  scheme: str  # "budget" or "configuration"
  n_folds: int
  n_unconverged: int  # fold refits that did not converge (their lowest point predicts)
  predicted_R: np.ndarray
  error_R: np.ndarray  # predicted / observed - 1

  @property
  def mean_abs(self) -> float:
    return float(np.mean(np.abs(self.error_R)))

  @property
  def max_abs(self) -> float:
    return float(np.max(np.abs(self.error_R)))

  def bias_by_G(self, g_R) -> dict[int, float]:
    """Mean signed error per G: a law that misses one G in one direction shows it here."""
    return {int(g): float(np.mean(self.error_R[g_R == g])) for g in np.unique(g_R)}


def laplace_aic(objective: float, n_rows: int, n_params: int, delta: float) -> float:
  """2 n log(H / (n delta)) + 2 k. With delta below the residuals' scale, the Huber objective H is
  delta times the sum of absolute log residuals (less delta/2 each), so the fit is a Laplace
  maximum likelihood and this is its AIC up to a constant shared by every law: an estimate of
  out-of-sample fit that charges 2 per parameter. It treats rows as independent."""
  return float(2 * n_rows * np.log(objective / (n_rows * delta)) + 2 * n_params)


def columns_of(frame, candidates: Mapping[str, laws.Law], source: str) -> dict[str, np.ndarray]:
  """The columns every candidate reads, validated (fit_data.validate: errors name the rows), and
  C, a run's budget, where the table has it."""
  columns = {}
  for law in candidates.values():
    columns.update(fit_data.validate(frame, law, source=source))
  if "C" in frame.columns:
    columns["C"] = frame["C"].to_numpy(float)
  return columns


def _fold_labels(columns: Mapping[str, np.ndarray], scheme: str) -> np.ndarray:
  if scheme == "budget":
    return np.asarray(columns["C"], np.float64)
  keys = np.stack([np.asarray(columns[k], np.float64) for k in ("N", "D", "G")], axis=1)
  return np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)


def held_out(result: fitting.FitResult, labels_R: np.ndarray, scheme: str) -> HeldOut:
  """`result`'s law refitted without each fold of `labels_R` (one label per row): every fold's
  refit at once, as bootstrap refits with the fold's rows weighted 0 (bootstrap.refit_resamples:
  from the full fit's optimum, with every retry), then the fold's rows predicted."""
  problem = result.problem
  folds = np.unique(labels_R)
  in_fold_FR = labels_R[None, :] == folds[:, None]
  x_P = np.array([result.params[k] for k in problem.names])
  with jax.enable_x64(True):
    ends, _ = bootstrap.refit_resamples(problem, x_P, (~in_fold_FR).astype(np.float64),
                                      fitting.Solver(), fit_stages.HOST)
    params_F = {k: jnp.asarray(v) for k, v in zip(problem.names, np.asarray(ends.x_SP).T)}
    data = fitting.as_data(problem.data)
    predicted_FR = np.asarray(jax.vmap(
        lambda p: laws.loss(problem.law, {**problem.fixed, **p}, data))(params_F))
  predicted_R = predicted_FR[in_fold_FR.argmax(axis=0), np.arange(problem.n_rows)]
  observed_R = np.asarray(problem.data["loss"])
  return HeldOut(scheme, len(folds), int((~np.asarray(ends.converged_S)).sum()), predicted_R,
                 predicted_R / observed_R - 1)


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One law of a comparison: its full fit with intervals, held-out errors and penalised fit."""
  name: str
  fitted: fitted_law.FittedLaw
  held_out: dict[str, HeldOut]  # by scheme
  aic: float

  @property
  def n_params(self) -> int:
    return len(self.fitted.result.params)


class Confidence(NamedTuple):
  """How sure the ranking's first place is, over resampled configurations."""
  best_share: float  # share of resamples in which the best law keeps the lowest mean |error|
  runner_up: str | None
  margin: float | None  # runner-up's mean |error| minus the best's
  margin_ci95: tuple[float, float] | None
  n_resamples: int


def _confidence(ranked: Sequence[Candidate], scheme: str, groups_R: np.ndarray,
                seed: int) -> Confidence:
  abs_LR = np.stack([np.abs(c.held_out[scheme].error_R) for c in ranked])
  if len(ranked) < 2:
    return Confidence(1.0, None, None, None, 0)
  _, group_R = np.unique(groups_R, return_inverse=True)
  n_groups = group_R.max() + 1
  rng = np.random.default_rng(seed)
  counts_BG = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=N_RESAMPLES)
  weights_BR = counts_BG[:, group_R]
  mean_BL = (weights_BR @ abs_LR.T) / weights_BR.sum(axis=1, keepdims=True)
  margin_B = mean_BL[:, 1] - mean_BL[:, 0]
  return Confidence(float(np.mean(np.argmin(mean_BL, axis=1) == 0)), ranked[1].name,
                    float(abs_LR[1].mean() - abs_LR[0].mean()),
                    (float(np.percentile(margin_B, 2.5)), float(np.percentile(margin_B, 97.5))),
                    N_RESAMPLES)


@dataclasses.dataclass(frozen=True)
class Comparison:
  candidates: list[Candidate]  # best first, by `ranked_by`'s mean absolute held-out error
  ranked_by: str
  confidence: Confidence
  g_R: np.ndarray

  @property
  def best(self) -> Candidate:
    return self.candidates[0]

  def summary(self) -> dict:
    """JSON-ready: the ranking, each law's held-out errors, AIC and full fit summary."""
    out = {"ranked_by": self.ranked_by, "best": self.best.name,
           "confidence": self.confidence._asdict(),
           "penalty": "Laplace AIC: 2 n log(H / (n delta)) + 2 k", "laws": {}}
    for c in self.candidates:
      out["laws"][c.name] = {
          "n_params": c.n_params, "objective": c.fitted.result.objective, "aic": c.aic,
          "held_out": {s: {"n_folds": h.n_folds, "n_unconverged": h.n_unconverged,
                           "mean_abs": h.mean_abs, "max_abs": h.max_abs,
                           "bias_by_G": {str(g): b for g, b in h.bias_by_G(self.g_R).items()}}
                       for s, h in c.held_out.items()},
          "fit": c.fitted.summary()}
    return out


def compare(candidates: Mapping[str, laws.Law], columns: Mapping[str, np.ndarray], *,
            n_bootstrap: int = 1000, seed: int = 0, starts_every: int = 1,
            delta: float = fitting.DEFAULT_DELTA, progress: bool = False,
            fitted: Mapping[str, fitted_law.FittedLaw] | None = None) -> Comparison:
  """Fits every law of `candidates` ({name: Law}) to the same rows (`columns`: N, D, G, loss,
  and C, a run's budget, for leave-one-budget-out) and ranks them by held-out error. `fitted`
  holds fits of these rows already made the same way (bootstrap, seed, starts, delta), which
  are used instead of fitting again. Laws are fitted one per usable core at once: the fitter's
  XLA programs on a CPU keep about one core busy each."""
  if not candidates:
    raise ValueError("compare needs at least one law")
  schemes = [s for s in SCHEMES if s != "budget" or ("C" in columns
                                                    and np.unique(columns["C"]).size >= 3)]
  labels = {s: _fold_labels(columns, s) for s in schemes}
  fitted = fitted or {}
  threads = min(len(candidates), _usable_cores())

  def candidate(name: str) -> Candidate:
    law = candidates[name]
    data = {k: np.asarray(columns[k], np.float64) for k in ("loss",) + law.columns}
    fit = fitted.get(name) or fitted_law.fit_law(
        law, data, n_bootstrap=n_bootstrap, seed=seed, delta=delta,
        starts=law.starts(starts_every), progress=progress and threads == 1)
    result = fit.result
    return Candidate(name, fit, {s: held_out(result, labels[s], s) for s in schemes},
                     laplace_aic(result.objective, result.n_rows, len(result.params), delta))

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    out = list(pool.map(candidate, candidates))
  ranked = sorted(out, key=lambda c: c.held_out[schemes[0]].mean_abs)
  confidence = _confidence(ranked, schemes[0], labels["configuration"], seed)
  return Comparison(ranked, schemes[0], confidence, np.asarray(columns["G"]))


def _usable_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def bias_text(law: Mapping, scheme: str) -> str:
  """One law's mean signed held-out error per G, in %, from its summary."""
  bias = law["held_out"][scheme]["bias_by_G"]
  return ", ".join(f"G={g}: {100 * b:+.2f}" for g, b in bias.items())


def confidence_text(summary: Mapping) -> str:
  """The best law and how sure its first place is, in words ("" with one law)."""
  c = summary["confidence"]
  if c["runner_up"] is None:
    return ""
  lo, hi = c["margin_ci95"]
  return (f"best: {summary['best']}, lowest in {c['best_share']:.1%} of {c['n_resamples']} "
          f"resamples of configurations (seeds of one configuration together); "
          f"{c['runner_up']}'s mean |error| is {100 * c['margin']:+.2f} points higher "
          f"[{100 * lo:+.2f}, {100 * hi:+.2f}]")


def comparison_table(summary: Mapping) -> str:
  """The ranking as printed text: held-out errors (%), per-G bias, AIC."""
  by = summary["ranked_by"]
  schemes = list(next(iter(summary["laws"].values()))["held_out"])
  head = f"{'law':>10} {'k':>2} " + " ".join(f"{s[:6] + ' mean/max %':>19}" for s in schemes)
  lines = [f"laws ranked by leave-one-{by}-out mean |error|",
           head + f" {'AIC':>9}  bias by G (%, {by} folds)"]
  for name, law in summary["laws"].items():
    errors = " ".join(f"{100 * h['mean_abs']:>9.2f}/{100 * h['max_abs']:<9.2f}"
                      for h in law["held_out"].values())
    lines.append(f"{name:>10} {law['n_params']:>2} {errors} {law['aic']:>9.2f}  "
                 f"{bias_text(law, by)}")
  return "\n".join(lines + [confidence_text(summary)])
