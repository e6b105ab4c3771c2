"""A study's report rendered for people and files: report.json, report.md (tables, plots
linked), the PNG plots (plots.py) and the fit-ready tables, from an Analysis
(famjax.analysis.study_analysis)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from famjax.analysis import plots, timing
from famjax.analysis.gamma_grid import GammaGrid, Slope, Tax, Trend
from famjax.analysis.measured_leverage import LeverageAtOptimum, MeasuredLeverage
from famjax.analysis.placements import Placements
from famjax.analysis.report import Analysis, Edge, Extrapolation, FromLaw, Regime, Report
from famjax.common.files import atomic_write_text
from famjax.scaling import compare, fitted_law
from famjax.study import records


def write(study_dir: str | Path, analysis: Analysis) -> dict[str, Path]:
  """report.json, report.md, the PNG plots and the fit-ready tables (STUDY/data/)."""
  study_dir = Path(study_dir)
  with timing.section("plots"):
    figures = plots.draw_all(study_dir / "plots", analysis)
  options = analysis.report.options
  with timing.section("tables and report"):
    tables = records.write_tables(analysis.frame, study_dir / "data", loss=options.fit_loss,
                                  param_count=options.param_count)
    atomic_write_text(study_dir / "report.json", json.dumps(
        _strict(analysis.report.to_json()), indent=1, default=_json_default))
    atomic_write_text(study_dir / "report.md", markdown(analysis.report, figures, study_dir))
  return {"report.json": study_dir / "report.json", "report.md": study_dir / "report.md",
          **figures, **tables}


def _strict(x):
  """NaN and infinities (an interval the bootstrap could not give) become null: strict JSON."""
  if isinstance(x, dict):
    return {k: _strict(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_strict(v) for v in x]
  if isinstance(x, (float, np.floating)) and not math.isfinite(x):
    return None
  return x


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _fmt(x, digits=4) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  return f"{x:.{digits}g}"


def _ci(ci) -> str:
  return "" if not ci else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _law_lines(name: str, law: dict) -> list[str]:
  boot = law.get("bootstrap")
  lines = ["", f"## {name} law ({law['n_rows']} rows, objective {law['objective']:.4g})", "",
           "| parameter | estimate | SE | 95% interval |", "|---|---|---|---|"]
  for key in fitted_law.ORDER:
    value = {**law["params"], **law["derived"]}.get(key)
    if value is None:
      continue
    if key in law.get("boundary", {}):
      lines.append(f"| {key} | {_fmt(value)} | | unidentified: {law['boundary'][key]} |")
      continue
    se = _fmt(boot["se"][key]) if boot else ""
    lines.append(f"| {key} | {_fmt(value)} | {se} | {_ci(boot['ci95'][key]) if boot else ''} |")
  if boot:
    failed = f"; {boot['failed']} failed and are left out" if boot.get("failed") else ""
    lines.append(f"\n{boot['n']} bootstrap refits (whole runs resampled), "
                 f"{boot['converged']:.1%} converged{failed}.")
  if "gamma_test" in law:
    lines.append("\n" + fitted_law.gamma_test_line(law["gamma_test"]) + " (docs/statistics.md)")
  return lines


def _comparison_lines(summary: dict) -> list[str]:
  """The familial laws ranked by held-out error, with their parameters' intervals."""
  schemes = list(next(iter(summary["laws"].values()))["held_out"])
  by = summary["ranked_by"]
  lines = ["", "## Which familial law? Held-out error", "",
           "Each law refitted without one fold and predicting it; error = predicted / observed - 1,"
           " in %. Ranked by leave-one-" + by + "-out mean |error|; AIC is the Laplace AIC of the "
           "Huber fit, 2 n log(H / (n delta)) + 2 k (docs/statistics.md).", "",
           "| law | k | " + " | ".join(f"leave-one-{s}-out mean / max" for s in schemes)
           + f" | bias by G ({by} folds) | AIC | parameters (95% interval) |",
           "|---" * (len(schemes) + 5) + "|"]
  for name, law in summary["laws"].items():
    held = " | ".join(f"{100 * h['mean_abs']:.2f} / {100 * h['max_abs']:.2f}"
                      for h in law["held_out"].values())
    fit = law["fit"]
    ci = (fit.get("bootstrap") or {}).get("ci95", {})
    params = "; ".join(f"{k} {_fmt(fit['params'][k])} {_ci(ci.get(k))}".strip()
                       for k in fitted_law.ORDER if k in fit["params"])
    lines.append(f"| {name} | {law['n_params']} | {held} | {compare.bias_text(law, by)} | "
                 f"{law['aic']:.1f} | {params} |")
  sentence = compare.confidence_text(summary)
  if sentence:
    best = f"Best at predicting held-out runs: **{summary['best']}**"
    lines.append("\n" + sentence.replace(f"best: {summary['best']}", best) + ".")
  return lines


def _flops_words(from_law: FromLaw, law_flops: dict | None) -> str:
  if from_law.flops_per_token == "6N":
    return "C = 6ND"
  error = max(e for _, _, e in law_flops.values())
  return (f"C = k(N, G) D, k the runs' FLOPs per token fitted per G as c N^p over the ladder "
          f"(within {error:.1%})")


def _from_law_lines(from_law: FromLaw, law_flops: dict | None) -> list[str]:
  lines = []
  if from_law.leverage:
    lines += ["", "## Efficiency Leverage from the familial law", "",
              f"{_flops_words(from_law, law_flops)}; exits g/G of N*; the G dense models "
              "share C.", "",
              "| C | G | EL | 95% interval |", "|---|---|---|---|"]
    lines += [f"| {e.C:.3g} | {e.G} | {_fmt(e.EL)} | {_ci(e.ci95)} |" for e in from_law.leverage]
  lines += ["", "## Compute-optimal model size N*(C) per G", "",
            f"{_flops_words(from_law, law_flops)}.", "",
            "| C | G | N* | 95% interval | D* |", "|---|---|---|---|---|"]
  lines += [f"| {e.C:.3g} | {e.G} | {_fmt(e.N_opt)} | {_ci(e.ci95)} | {_fmt(e.D_opt)} |"
            for e in from_law.compute_optimal]
  return lines


def _measured_leverage_lines(measured: list[MeasuredLeverage]) -> list[str]:
  lines = ["", "## Measured Efficiency Leverage (G size-matched dense models, C/G each)", "",
           "| family | C | G | family loss | dense losses | measured EL | law EL | 95% interval |",
           "|---|---|---|---|---|---|---|---|"]
  for e in measured:
    dense = ", ".join(_fmt(x) for x in e.dense_losses)
    lines.append(f"| `{e.family}` | {e.C:.3g} | {e.G} | {_fmt(e.family_loss)} | {dense} | "
                 f"{_fmt(e.measured)} | {_fmt(e.law)} | {_ci(e.law_ci95)} |")
  return lines


def _optimum_lines(optimum: list[LeverageAtOptimum]) -> list[str]:
  lines = ["", "## Measured Efficiency Leverage at the fitted optimum", "",
           "Per leverage point, the family nearest the familial law's N*(C) in log N among the "
           "widths with dense models for the most seeds; its measured EL per seed, their mean "
           "and a 95% Student t interval over seeds (two seeds give a wide one).", "",
           "| C | G | N* (law) | family N | seeds | measured EL per seed | mean | 95% interval | "
           "law EL | 95% interval |", "|---|---|---|---|---|---|---|---|---|---|"]
  for e in optimum:
    per_seed = ", ".join(_fmt(x) for x in e.measured)
    lines.append(f"| {e.C:.3g} | {e.G} | {_fmt(e.N_opt)} | {_fmt(e.N_family)} | "
                 f"{len(e.families)} | {per_seed} | {_fmt(e.mean)} | {_ci(e.ci95)} | "
                 f"{_fmt(e.law)} | {_ci(e.law_ci95)} |")
  return lines


def _checks_lines(extrapolation: Extrapolation, edges: list[Edge]) -> list[str]:
  lines = ["", "## Extrapolation check", ""]
  x = extrapolation
  if x.skipped:
    lines.append(f"Not run: {x.skipped}")
  else:
    lines.append(
        f"Familial law refitted without the largest budget (C = {x.held_out_budget:.3g}, "
        f"{x.n_held_out} runs held out): mean absolute relative error "
        f"{x.mean_abs_relative_error:.2%}, max {x.max_abs_relative_error:.2%}, mean signed "
        f"{x.mean_relative_error:+.2%}.")
  lines += ["", "## IsoFLOP minima", "", "| C | G | best N | loss | minimum at |",
            "|---|---|---|---|---|"]
  for e in edges:
    flag = e.minimum_at + ("" if e.minimum_at == "interior" else " (not bracketed)")
    lines.append(f"| {e.C:.3g} | {e.G} | {_fmt(e.best_N)} | {_fmt(e.best_loss)} | {flag} |")
  return lines


def _param_count_lines(param_counts: dict) -> list[str]:
  counts = list(param_counts)
  lines = ["", "## The familial law under both definitions of N", "",
           "| parameter | " + " | ".join(f"N = {c.replace('_', '-')}" for c in counts) + " |",
           "|---|" + "---|" * len(counts)]
  for name in ("gamma", "alpha", "beta"):
    cells = [f"{_fmt(param_counts[c][name]['estimate'])} {_ci(param_counts[c][name]['ci95'])}"
             for c in counts]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines.append("\nThe paper names its models by their total size and does not define N further "
               "(docs/statistics.md, \"Which N\").")
  return lines


def _slope(x: Slope) -> str:
  return f"{_fmt(x.estimate)} {_ci(x.ci95)}"


def _law_ci(law: dict | None, name: str) -> str:
  if not law:
    return "not fitted"
  ci = (law.get("bootstrap") or {}).get("ci95", {}).get(name)
  return f"{_fmt(law['params'][name])} {_ci(ci)}"


def trend_verdict(trend: Trend) -> str:
  """Whether gamma's part rises with D, levels off, or neither can be told (95% intervals)."""
  lo, hi = trend.slope.ci95
  direction = "rises" if lo > 0 else "falls" if hi < 0 else None
  bend = trend.curvature and (trend.curvature.ci95[1] < 0 or trend.curvature.ci95[0] > 0)
  if direction is None and not bend:
    return "neither a rise nor a fall with D can be told at this precision"
  if trend.curvature is None:
    return f"{direction} with D (two D values: whether it levels off cannot be told)"
  if not bend:
    return f"{direction} with D at a rate the grid cannot tell from constant in ln D"
  shape = "levels off" if (trend.curvature.estimate < 0) == (trend.slope.estimate > 0) else \
      "steepens"
  return f"{direction or 'changes'} with D and {shape} (curvature's interval excludes 0)"


def _trend_lines(trends: list[Trend]) -> list[str]:
  if not trends:
    return []
  lines = ["", f"gamma against D: gamma = one per width + slope * ln(D / "
               f"{trends[0].d_reference:,.0f}) + curvature * ln(D / ...)^2 (pooled, 95% t "
               "intervals):", "", "| part | slope per ln D | curvature | reading |",
           "|---|---|---|---|"]
  lines += [f"| {t.part} | {_slope(t.slope)} | "
            f"{_slope(t.curvature) if t.curvature else 'n/a (two D values)'} | "
            f"{trend_verdict(t)} |" for t in trends]
  return lines


def _tax_lines(taxes: list[Tax]) -> list[str]:
  if not taxes:
    return []
  lines = ["", "The deepest exit's tax: its loss over the dense backbone's (G = 1, same width, "
               "tokens and seed), minus 1; 95% t interval pooled over every cell and G:", "",
           "| width | D | G | seeds | tax | 95% interval |", "|---|---|---|---|---|---|"]
  interval = lambda t: (f"[{t.ci95[0]:+.2%}, {t.ci95[1]:+.2%}]"
                        if all(map(math.isfinite, t.ci95)) else "n/a (one seed)")
  lines += [f"| {t.d_model} | {t.D:,} | {t.G} | {t.n_seeds} | {t.ratio:+.2%} | {interval(t)} |"
            for t in taxes]
  return lines


def _gamma_grid_lines(grid: GammaGrid, fits: dict) -> list[str]:
  familial = fits["familial"].summary() if "familial" in fits else None
  lines = ["", "## gamma without the law (gamma grid)", "",
           "Families of every G on one backbone, trained on the same tokens; gamma_direct = slope "
           "of log(mean exit loss) on log G, intercept per seed, 95% t interval.", "",
           "size: the same slope of the mean loss of dense controls shaped like each exit (what "
           "exit size explains); sharing = gamma_direct - size (what one shared backbone costs).",
           "", "| width | D | families | gamma_direct [95%] | size [95%] | sharing [95%] |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {c.d_model} | {c.D:,} | {c.n_families} | {_slope(c.gamma)} | "
            f"{_slope(c.size) if c.size else 'no controls'} | "
            f"{_slope(c.sharing) if c.sharing else 'no controls'} |" for c in grid.cells]
  lines += _trend_lines(grid.trends)
  lines += ["", f"One gamma for all cells: {_slope(grid.shared)}; the familial law's gamma: "
                f"{_law_ci(familial, 'gamma')}. One gamma for all cells on each loss: "
                + "; ".join(f"{loss} {_slope(s)}" for loss, s in grid.shared_by_loss.items())
                + "."]
  for t in grid.homogeneity:
    lines.append(f"- a gamma per {t.per.replace('d_model', 'width')} ({t.n_groups}) against one: "
                 f"F({t.df[0]}, {t.df[1]}) = {_fmt(t.f, 3)}, p = {_fmt(t.p, 3)}")
  lines += _tax_lines(grid.tax)
  if grid.branch:
    b = grid.branch
    lines += ["", f"Branch exponents, {b.n_exits} exits over dense controls of their own shape "
                  "(same tokens, same seed), against the branch law fitted to the IsoFLOP runs:",
              "", "| exponent | with controls | branch law |", "|---|---|---|"]
    branch = fits["branch"].summary() if "branch" in fits else None
    lines += [f"| alpha_b (P above) | {_slope(b.alpha_b)} | {_law_ci(branch, 'alpha_b')} |",
              f"| beta_b (Q below) | {_slope(b.beta_b)} | {_law_ci(branch, 'beta_b')} |"]
  return lines


def _placement_lines(found: Placements) -> list[str]:
  upstream = found.alpha_b.ci95
  verdict = ("exits above an exit raise its loss" if upstream[0] > 0 else
             "exits above an exit lower its loss" if upstream[1] < 0 else
             "no cost of the exits above an exit can be told")
  lines = ["", "## Exits decoupled from G (exit placements)", "",
           f"{found.n_families} families, {found.n_exits} exits, each over the dense control of "
           "its own shape (same width, tokens and seed); no intercept; 95% percentile intervals "
           f"from {found.n_bootstrap} resamples of whole families:", "",
           "| model | coefficient | estimate [95%] | residual sum of squares |",
           "|---|---|---|---|",
           f"| branch terms | alpha_b on log(1+P), P exits above | {_slope(found.alpha_b)} | "
           f"{_fmt(found.rss_two)} |",
           f"| | beta_b on log(1+Q), Q exits below | {_slope(found.beta_b)} | |",
           f"| one exponent | on log G | {_slope(found.one_exponent)} | {_fmt(found.rss_one)} |",
           "", f"Upstream exits: {verdict} (alpha_b's interval).", "",
           "| exits at layers | exit | P | Q | seeds | loss over its own shape - 1 |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {e.placement} | {e.exit_layer} | {e.P} | {e.Q} | {e.n_seeds} | "
            f"{e.excess:+.2%} |" for e in found.exits]
  return lines


def _regime_lines(regime: list[Regime]) -> list[str]:
  lines = ["", "## Regime of the planned families", "",
           "| G | families | embedding + exit heads, share of parameters | FLOPs / dense model of "
           "the same shape |", "|---|---|---|---|"]
  for r in regime:
    (s0, s1), (f0, f1) = r.outside_backbone_share, r.flops_over_dense
    lines.append(f"| {r.G} | {r.n_families} | {s0:.1%} - {s1:.1%} | {f0:.3g} - {f1:.3g} |")
  return lines


def markdown(report: Report, figures: dict, study_dir: Path) -> str:
  """The tables a person reads, with the plots linked."""
  runs, options = report.runs, report.options
  lines = ["# IsoFLOP study report", "",
           f"Runs: {runs.finished} finished of {runs.planned} planned, "
           f"{len(runs.failed)} failed, {len(runs.missing)} not yet run; "
           f"{len(runs.dropped)} dropped at planning. Loss fitted: {options.fit_loss}; "
           f"N = {options.param_count.replace('_', '-')} parameters.", ""]
  for run_id, error in runs.failed.items():
    lines.append(f"- failed: `{run_id}`: {error.splitlines()[0][:200]}")
  if report.validation_noise is not None:
    noise = report.validation_noise
    lines += [f"Validation noise: one run's validation loss has a relative standard error of "
              f"{noise.relative_se:.3%} (from the gap between the two halves of its validation "
              f"batches, {noise.n_exits} run exits; the largest gap "
              f"{noise.largest_relative_gap:.2%} of the loss).", ""]
  if report.regime:
    lines += _regime_lines(report.regime)
  for name, law in report.laws.items():
    lines += _law_lines(name, law.summary())
  if not report.has_isoflop_runs:
    lines.append("No IsoFLOP runs (study.budgets = ()): no law is fitted.")
  for name, why in report.skipped_laws.items() if report.has_isoflop_runs else ():
    lines.append(f"\n{name} law not fitted: {why}")
  if report.param_counts:
    lines += _param_count_lines(report.param_counts)
  if report.from_law is not None:
    lines += _from_law_lines(report.from_law, report.from_law.flops_rule)
  if report.measured_leverage:
    lines += _measured_leverage_lines(report.measured_leverage)
  if report.leverage_at_optimum:
    lines += _optimum_lines(report.leverage_at_optimum)
  if report.law_comparison is not None:
    lines += _comparison_lines(report.law_comparison.summary())
  if report.gamma_grid is not None:
    lines += _gamma_grid_lines(report.gamma_grid, report.laws)
  if report.placements is not None:
    lines += _placement_lines(report.placements)
  if report.has_isoflop_runs:
    lines += _checks_lines(report.extrapolation, report.edges)
  if figures:
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({path.relative_to(study_dir)})" for name, path in figures.items()]
  return "\n".join(lines) + "\n"
