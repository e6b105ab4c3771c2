"""Figures of an IsoFLOP study (matplotlib, written as PNG): IsoFLOP curves with the fitted law,
loss against G, the branch law's factors, Efficiency Leverage, bootstrap spreads, the gamma grid
(loss against G per cell; gamma against D with its size and sharing parts), the law's residuals
against D and predicted against observed loss."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from famjax.analysis import gamma_grid
from famjax.scaling import fitting, laws


def _law_loss(law: laws.Law, params: dict, columns: dict) -> np.ndarray:
  with jax.enable_x64(True):
    return np.asarray(laws.loss(law, params, fitting.as_data(columns)))


def _colours(values) -> dict:
  cmap = matplotlib.colormaps["viridis"]
  values = sorted(values)
  return {v: cmap(i / max(1, len(values) - 1) * 0.85) for i, v in enumerate(values)}


def _tokens_along_curve(rows: pd.DataFrame):
  """D(N) on an IsoFLOP curve: FLOPs per token ~ N^b fitted per G over the runs (C / D)."""
  fits = {}
  for g, group in rows.groupby("G"):
    slope, intercept = np.polyfit(np.log(group["N"]), np.log(group["C"] / group["D"]), 1)
    fits[g] = (slope, intercept)
  return lambda c, n, g: c / np.exp(fits[g][1] + fits[g][0] * np.log(n))


def _subplots(*args, figsize, **kwargs):
  """A figure outside pyplot: no global backend or figure registry, so importing or calling this
  module changes nothing for the caller's own plots."""
  fig = Figure(figsize=figsize)
  return fig, fig.subplots(*args, **kwargs)


def _save(fig, path: Path) -> Path:
  for ax in fig.axes:  # a log axis spanning less than a decade labels its minor ticks: overlap
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.stem}.tmp.png")
  fig.savefig(tmp, dpi=110, bbox_inches="tight")
  tmp.replace(path)
  return path


N_LABELS = {"non_embedding": "N (family's non-embedding parameters)",
            "total": "N (family's parameters, embeddings included)"}


def _short(n: float) -> str:
  """n to two significant figures with a k or M suffix: 53,536 -> 54k."""
  n = float(f"{n:.2g}")
  return f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k" if n >= 1e3 else f"{n:g}"


def isoflop_curves(rows: pd.DataFrame, params: dict | None, path: Path,
                   param_count: str = "non_embedding") -> Path:
  """Loss against N per budget, one panel each, with the fitted familial law's curves."""
  budgets = sorted(rows["C"].unique())
  colours = _colours(rows["G"].unique())
  tokens = _tokens_along_curve(rows)
  fig, axes = _subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.6), squeeze=False)
  for ax, c in zip(axes[0], budgets):
    curve = rows[rows["C"] == c]
    for g, group in curve.groupby("G"):
      ax.scatter(group["N"], group["loss"], color=colours[g], label=f"G={g:g}", zorder=3)
      if params is not None:
        n = np.geomspace(group["N"].min() / 1.3, group["N"].max() * 1.3, 60)
        d = tokens(c, n, g)
        ax.plot(n, _law_loss(laws.FAMILIAL, params, {"N": n, "D": d, "G": np.full_like(n, g)}),
                color=colours[g], lw=1)
    ax.set(xscale="log", title=f"C = {c:.3g} FLOPs", xlabel=N_LABELS[param_count])
    # ticks at the smallest G's sizes (the other G's N differ by their exit heads only)
    n_values = sorted(curve.loc[curve["G"] == curve["G"].min(), "N"].unique())
    ax.set_xticks(n_values, [_short(n) for n in n_values])
    ax.legend(fontsize=8)
  axes[0][0].set_ylabel("loss")
  fig.suptitle("IsoFLOP curves: points measured, lines the fitted familial law")
  return _save(fig, path)


def loss_against_granularity(rows: pd.DataFrame, params: dict | None, path: Path) -> Path:
  """Per budget: the lowest measured loss over sizes at each G, and the law's minimum along the
  same IsoFLOP curve."""
  tokens = _tokens_along_curve(rows)
  colours = _colours(rows["C"].unique())
  fig, ax = _subplots(figsize=(5, 3.8))
  for c, curve in rows.groupby("C"):
    best = curve.groupby("G")["loss"].min()
    ax.plot(best.index, best.to_numpy(), "o", color=colours[c], label=f"C={c:.2g}")
    if params is not None:
      n = np.geomspace(curve["N"].min() / 2, curve["N"].max() * 2, 200)
      law_best = [_law_loss(laws.FAMILIAL, params,
                            {"N": n, "D": tokens(c, n, g), "G": np.full_like(n, g)}).min()
                  for g in best.index]
      ax.plot(best.index, law_best, "-", color=colours[c], lw=1)
  ax.set(xlabel="G (exits)", ylabel="lowest loss at C", xticks=sorted(rows["G"].unique()),
         title="Loss against granularity at fixed compute")
  ax.legend(fontsize=8)
  return _save(fig, path)


def branch_factors(rows: pd.DataFrame, params: dict, path: Path, controls=None) -> Path:
  """Each exit's loss over the dense part of the branch law, against P (divided by the fitted Q
  factor) and against Q (divided by the fitted P factor), with the fitted factors and, given
  the gamma grid's `controls` (gamma_grid.BranchControls), the exponents measured over dense
  models of each exit's own shape."""
  p = rows["exit"] - 1
  q = rows["G"] - rows["exit"]
  dense = _law_loss(laws.CHINCHILLA, params, {"N": rows["N"].to_numpy(float),
                                              "D": rows["D"].to_numpy(float)})
  ratio = rows["loss"].to_numpy(float) / dense
  p_factor = (1 + p) ** params["alpha_b"]
  q_factor = (1 + q) ** params["beta_b"]
  colours = _colours(rows["G"].unique())
  fig, axes = _subplots(1, 2, figsize=(9, 3.6))
  for ax, x, y, exponent, label in ((axes[0], p, ratio / q_factor, params["alpha_b"], "P"),
                                    (axes[1], q, ratio / p_factor, params["beta_b"], "Q")):
    for g in sorted(rows["G"].unique()):
      mask = (rows["G"] == g).to_numpy()
      ax.scatter(x[mask], y[mask], color=colours[g], s=14, label=f"G={g:g}")
    grid = np.linspace(0, max(1, x.max()), 50)
    ax.plot(grid, (1 + grid) ** exponent, "k-", lw=1,
            label=f"branch law: (1+{label})^{exponent:.3g}")
    if controls is not None:
      measured = (controls.alpha_b if label == "P" else controls.beta_b).estimate
      ax.plot(grid, (1 + grid) ** measured, "k--", lw=1,
              label=f"over own-shape controls: (1+{label})^{measured:.3g}")
    ax.set(xlabel=f"{label} ({'upstream' if label == 'P' else 'downstream'} exits)",
           ylabel="loss / dense law")
    ax.legend(fontsize=8)
  fig.suptitle("Branch law: per-exit loss factors")
  return _save(fig, path)


def leverage_plot(report, path: Path) -> Path:
  """EL from the law (with its interval) and measured EL, against C per G (report.Report)."""
  fig, ax = _subplots(figsize=(5.2, 3.8))
  from_law = report.from_law.leverage if report.from_law and report.from_law.leverage else []
  frame = pd.DataFrame([dataclasses.asdict(e) for e in from_law])
  measured = report.measured_leverage
  colours = _colours(set(frame["G"]) | {e.G for e in measured} if len(frame)
                     else {e.G for e in measured})
  for g, group in (frame.groupby("G") if len(frame) else []):
    ax.plot(group["C"], group["EL"], "-", color=colours[g], label=f"law, G={g}")
    cis = [ci for ci in group["ci95"] if ci]
    if len(cis) == len(group):
      lo, hi = np.array(cis).T
      ax.fill_between(group["C"], lo, hi, color=colours[g], alpha=0.2)
  optimum = report.leverage_at_optimum or []
  for e in optimum:  # the family nearest N*(C): mean over seeds, t interval when 2+ seeds
    low, high = e.ci95 or (e.mean, e.mean)
    ax.errorbar(e.C, e.mean, yerr=[[e.mean - low], [high - e.mean]], fmt="D", capsize=3,
                color=colours[e.G], markeredgecolor="k", label=f"measured at N*, G={e.G}")
  for e in measured:  # each family: small dots beside the optimum's, else the diamonds
    ax.plot(e.C * (0.96 if optimum else 1.0), e.measured, "." if optimum else "D",
            color=colours[e.G], markeredgecolor="k", ms=4 if optimum else 6,
            label=None if optimum else f"measured, G={e.G}")
  for e in optimum or measured:
    if e.law_ci95:  # a percentile interval need not contain the point estimate
      low, high = max(0.0, e.law - e.law_ci95[0]), max(0.0, e.law_ci95[1] - e.law)
      ax.errorbar(e.C * 1.04, e.law, yerr=[[low], [high]], fmt="s", color=colours[e.G], ms=4,
                  capsize=3)
    if e.law_ci95:
      ax.annotate(f"law {e.law:.3f}", (e.C * 1.04, e.law), xytext=(4, 0),
                  textcoords="offset points", fontsize=6, va="center")
  for e in optimum:
    ax.annotate(f"G={e.G}: {e.mean:.3f}", (e.C, e.mean), xytext=(-4, 0),
                textcoords="offset points", fontsize=6, ha="right", va="center")
  ax.axhline(1.0, color="grey", lw=0.8, ls=":")
  ax.set(xscale="log", xlabel="C (FLOPs)", ylabel="Efficiency Leverage",
         title="EL: law (bands: 95%), measured (diamonds), law at them (squares)")
  ax.title.set_fontsize(9)
  fig.text(0.01, -0.04, "EL(C, G) = loss of the G dense models of C/G FLOPs each (mean) / "
           "loss of the family's exits (mean): > 1, the family is the better use of C",
           fontsize=7, ha="left")
  ax.legend(fontsize=7)
  return _save(fig, path)


def bootstrap_spreads(samples: dict, estimates: dict, ci95: dict, path: Path) -> Path:
  names = [k for k in ("gamma", "alpha", "beta") if k in samples]
  fig, axes = _subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
  for ax, name in zip(axes[0], names):
    values = np.asarray(samples[name])
    ax.hist(values[np.isfinite(values)], bins=40, color="#4c72b0", alpha=0.8)
    ax.axvline(estimates[name], color="k", lw=1.2, label="estimate")
    for x in ci95[name]:
      ax.axvline(x, color="k", ls="--", lw=0.8)
    ax.set(title=name, xlabel="bootstrap refits")
  axes[0][0].legend(fontsize=8)
  fig.suptitle("Bootstrap distributions (dashed: 95% interval)")
  return _save(fig, path)


def predicted_vs_observed(rows: pd.DataFrame, params: dict, extrapolation: pd.DataFrame | None,
                          path: Path) -> Path:
  predicted = _law_loss(laws.FAMILIAL, params, {k: rows[k].to_numpy(float) for k in "NDG"})
  fig, ax = _subplots(figsize=(4.4, 4.2))
  colours = _colours(rows["G"].unique())
  for g in sorted(rows["G"].unique()):
    mask = (rows["G"] == g).to_numpy()
    ax.scatter(rows["loss"][mask], predicted[mask], color=colours[g], s=16, label=f"G={g:g}")
  if extrapolation is not None:
    held = extrapolation[extrapolation["held_out"]]
    ax.scatter(held["loss"], held["predicted"], marker="x", color="crimson",
               label="held-out budget,\nfit without it")
  lo, hi = rows["loss"].min() * 0.98, rows["loss"].max() * 1.02
  ax.plot([lo, hi], [lo, hi], "k:", lw=1)
  ax.set(xlabel="observed loss", ylabel="familial law", title="Predicted against observed")
  ax.legend(fontsize=8)
  return _save(fig, path)


def gamma_grid_plot(families: pd.DataFrame, grid, law_gamma: float | None, path: Path) -> Path:
  """Mean exit loss against G per gamma-grid cell (one point per seed), with each cell's slope
  (gamma_direct) through the cell's mean, and the familial law's gamma for comparison."""
  fig, ax = _subplots(figsize=(6, 4))
  cells = {(c.d_model, c.D): c for c in grid.cells}
  colours = _colours(list(cells))
  for (width, tokens), cell in families.groupby(["d_model", "D"]):
    if (width, tokens) not in cells:
      continue
    colour, slope = colours[(width, tokens)], cells[(width, tokens)].gamma
    ax.scatter(cell["G"], cell["loss"], color=colour, s=14)
    g = np.array(sorted(cell["G"].unique()), float)
    mean_log = np.log(cell["loss"]).mean() - slope.estimate * np.log(cell["G"]).mean()
    ax.plot(g, np.exp(mean_log + slope.estimate * np.log(g)), color=colour,
            label=f"width {width}, D {tokens:,}: gamma {slope.estimate:.3f}")
  title = "gamma without the law" + (f" (law: {law_gamma:.3f})" if law_gamma is not None else "")
  ax.set(xscale="log", yscale="log", xlabel="G (exits)", ylabel="mean exit loss", title=title)
  g_values = sorted(int(g) for g in families["G"].unique())
  ax.set_xticks(g_values, [str(g) for g in g_values])
  ax.set_yticks(np.geomspace(families["loss"].min(), families["loss"].max(), 5))
  ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3f"))
  ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.legend(fontsize=7)
  return _save(fig, path)


PART_MARKERS = {"gamma": ("o", "gamma_direct"), "size": ("^", "size (exit-shaped controls)"),
                "sharing": ("s", "sharing = gamma - size")}


def gamma_against_tokens(grid, law_gamma: float | None, path: Path) -> Path:
  """Each grid cell's gamma_direct and its size and sharing parts against D, one colour per
  width, with 95% t intervals."""
  fig, ax = _subplots(figsize=(6.4, 4.2))
  widths = sorted({c.d_model for c in grid.cells})
  colours = _colours(widths)
  for k, (part, (marker, label)) in enumerate(PART_MARKERS.items()):
    for j, width in enumerate(widths):
      cells = [c for c in grid.cells if c.d_model == width and getattr(c, part) is not None]
      if not cells:
        continue
      slopes = [getattr(c, part) for c in cells]
      d = np.array([c.D for c in cells], float) * 1.04 ** (k - 1 + 0.3 * j)  # side by side
      y = np.array([s.estimate for s in slopes])
      err = np.abs(np.array([s.ci95 for s in slopes]).T - y)
      ax.errorbar(d, y, yerr=err, fmt=marker + {"gamma": "-", "size": "--"}.get(part, ":"),
                  color=colours[width], ms=5, lw=1, capsize=2,
                  label=f"{label}, width {width}")
  if law_gamma is not None:
    ax.axhline(law_gamma, color="grey", ls=":", lw=1, label=f"familial law's gamma {law_gamma:.3f}")
  ax.axhline(0, color="black", lw=0.5)
  ax.set(xscale="log", xlabel="D (training tokens)", ylabel="slope of log loss on log G",
         title="gamma against tokens, split into exit size and sharing")
  tokens = sorted({c.D for c in grid.cells})
  ax.set_xticks(tokens, [f"{d / 1e6:.3g}M" for d in tokens])
  ax.legend(fontsize=6.5, ncol=2)
  return _save(fig, path)


def residuals_against_tokens(rows: pd.DataFrame, params: dict, path: Path) -> Path:
  """The familial law's residuals (observed / predicted - 1) against D, coloured by G: a law
  that describes the data leaves no pattern in D or G."""
  predicted = _law_loss(laws.FAMILIAL, params, {k: rows[k].to_numpy(float) for k in "NDG"})
  residual = rows["loss"].to_numpy(float) / predicted - 1
  fig, ax = _subplots(figsize=(5.6, 3.8))
  colours = _colours(rows["G"].unique())
  for g in sorted(rows["G"].unique()):
    mask = (rows["G"] == g).to_numpy()
    ax.scatter(rows["D"][mask], 100 * residual[mask], color=colours[g], s=16, label=f"G={g:g}")
  ax.axhline(0, color="black", lw=0.8)
  ax.set(xscale="log", xlabel="D (training tokens)", ylabel="observed / familial law - 1 (%)",
         title="Residuals of the familial law against D")
  ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
  ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda d, _: f"{d / 1e6:g}M"))
  ax.legend(fontsize=8)
  return _save(fig, path)


def placements_plot(found, path: Path) -> Path:
  """Each placement's exits: loss over the dense control of the exit's own shape, against the
  exit's layer, one line per placement."""
  fig, ax = _subplots(figsize=(5.6, 3.8))
  by_placement: dict[str, list] = {}
  for e in found.exits:
    by_placement.setdefault(e.placement, []).append(e)
  colours = _colours(list(by_placement))
  for k, (where, exits) in enumerate(by_placement.items()):
    layers = np.array([e.exit_layer for e in exits], float) + 0.04 * (k - len(by_placement) / 2)
    ax.plot(layers, [100 * e.excess for e in exits], "o-", color=colours[where], ms=5, lw=1,
            label=f"exits at {{{where}}}")
  ax.axhline(0, color="black", lw=0.8)
  a, b = found.alpha_b, found.beta_b
  ax.set(xlabel="exit layer", ylabel="loss / own-shape dense control - 1 (%)",
         title=f"Exit placements: alpha_b {a.estimate:.3f} [{a.ci95[0]:.3f}, {a.ci95[1]:.3f}], "
               f"beta_b {b.estimate:.3f}")
  ax.title.set_fontsize(9)
  ax.set_xticks(sorted({e.exit_layer for e in found.exits}))
  ax.legend(fontsize=7, ncol=2)
  return _save(fig, path)


def draw_all(outdir: Path, analysis) -> dict[str, Path]:
  """Every figure the analysis has data for, as {name: path}."""
  outdir = Path(outdir)
  fits, rows, report = analysis.fits, analysis.rows, analysis.report
  familial = fits.get("familial")
  params = familial.result.params if familial else None
  figures = {}
  if len(rows["familial"]):
    figures["isoflop"] = isoflop_curves(rows["familial"], params, outdir / "isoflop.png",
                                        report.options.param_count)
    figures["loss_vs_G"] = loss_against_granularity(rows["familial"], params,
                                                    outdir / "loss_vs_G.png")
  if "branch" in fits:
    figures["branch"] = branch_factors(
        rows["branch"], fits["branch"].result.params, outdir / "branch.png",
        report.gamma_grid.branch if report.gamma_grid is not None else None)
  if (report.from_law and report.from_law.leverage) or report.measured_leverage:
    figures["leverage"] = leverage_plot(report, outdir / "leverage.png")
  if familial and familial.boot:
    figures["bootstrap"] = bootstrap_spreads(familial.boot.samples,
                                             laws.to_natural_params(familial.result.params),
                                             familial.boot.ci95, outdir / "bootstrap.png")
  if report.gamma_grid is not None:
    figures["gamma_grid"] = gamma_grid_plot(
        gamma_grid.family_rows(analysis.frame, report.options.fit_loss), report.gamma_grid,
        laws.to_natural_params(params)["gamma"] if params else None, outdir / "gamma_grid.png")
  if report.gamma_grid is not None and report.gamma_grid.cells:
    figures["gamma_vs_D"] = gamma_against_tokens(
        report.gamma_grid, laws.to_natural_params(params)["gamma"] if params else None,
        outdir / "gamma_vs_D.png")
  if report.placements is not None:
    figures["placements"] = placements_plot(report.placements, outdir / "placements.png")
  if familial:
    figures["residuals_vs_D"] = residuals_against_tokens(rows["familial"], params,
                                                         outdir / "residuals_vs_D.png")
    figures["predicted_vs_observed"] = predicted_vs_observed(
        rows["familial"], params, analysis.extrapolation_rows,
        outdir / "predicted_vs_observed.png")
  return figures
