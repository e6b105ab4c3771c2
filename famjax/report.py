"""The IsoFLOP study's analysis: the unified familial law, the branch law and a dense-only
Chinchilla law, each with bootstrap 95% intervals (whole runs resampled); the tests of gamma > 0;
Efficiency Leverage from the fitted law and measured; compute-optimal N*(C) per G; an
extrapolation check; written as STUDY/report.json, STUDY/report.md and PNG plots.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from famjax import plots, results
from famjax.files import atomic_write_text
from famjax.isoflop import DENSE_MATCH, ISOFLOP
from famjax.scaling import fit as fitlib
from famjax.scaling import io, laws, leverage, record

LAW_OBJECTS = {"familial": laws.FAMILIAL, "branch": laws.BRANCH, "chinchilla": laws.CHINCHILLA}


@dataclasses.dataclass(frozen=True)
class Options:
  loss: str = "val"  # "val" or "train"
  param_count: str = "non_embedding"  # N of the laws
  n_bootstrap: int = 1000
  grid_every: int = 1
  seed: int = 0


@dataclasses.dataclass
class Analysis:
  """What the report shows: `report` (JSON-ready) and the tables and fits its plots draw."""
  report: dict
  rows: dict[str, pd.DataFrame]
  fits: dict[str, record.FittedLaw]
  frame: pd.DataFrame
  extrapolation_rows: pd.DataFrame | None = None


def _data(rows: pd.DataFrame, law: laws.Law, source: str) -> dict[str, np.ndarray]:
  return io.validate(rows, law, source=source)


def _fit_laws(rows, options, progress) -> tuple[dict, dict]:
  fits, skipped = {}, {}
  for name, law in LAW_OBJECTS.items():
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


def _log_samples(fitted: record.FittedLaw) -> dict[str, np.ndarray] | None:
  if fitted.boot is None:
    return None
  names = fitted.result.params
  natural = {k: v for k, v in fitted.boot.samples.items() if k in laws.to_natural_params(names)}
  return {k: np.asarray(v) for k, v in laws.to_log_params(natural).items()}


def _interval(samples: np.ndarray) -> list[float]:
  finite = samples[np.isfinite(samples)]
  if not finite.size:
    return [math.nan, math.nan]
  return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def _with_interval(fn, params: dict, samples: dict | None) -> tuple[np.ndarray, np.ndarray | None]:
  """fn(params) and, over bootstrap samples, its 95% interval (last axis: low, high)."""
  with jax.enable_x64(True):
    estimate = np.asarray(jax.jit(fn)({k: jnp.float64(v) for k, v in params.items()}))
    if samples is None:
      return estimate, None
    values = np.asarray(jax.jit(jax.vmap(fn))({k: jnp.asarray(v) for k, v in samples.items()}))
  return estimate, np.stack([np.nanpercentile(values, 2.5, axis=0),
                             np.nanpercentile(values, 97.5, axis=0)], axis=-1)


def _leverage_from_law(fitted, budgets, granularities) -> dict:
  """EL(C, G) and N*(C) per G from the familial fit, C = 6ND (as the paper derives them)."""
  params, samples = fitted.result.params, _log_samples(fitted)
  el_gs = [g for g in granularities if g >= 2]
  out = {"budgets": list(budgets), "flops_per_token": "6N"}
  if el_gs:
    el, el_ci = _with_interval(lambda p: leverage.leverage_table(p, budgets, el_gs), params,
                               samples)
    out["leverage"] = [{"C": c, "G": g, "EL": float(el[i, j]),
                        "ci95": None if el_ci is None else el_ci[i, j].tolist()}
                       for i, c in enumerate(budgets) for j, g in enumerate(el_gs)]
  optimal = []
  for g in granularities:
    n_star, n_ci = _with_interval(
        lambda p: jax.vmap(lambda c: leverage.compute_optimal(p, c, g)[0])(
            jnp.asarray(budgets, jnp.float64)), params, samples)
    optimal += [{"C": c, "G": g, "N_opt": float(n_star[i]), "D_opt": float(c / (6 * n_star[i])),
                 "ci95": None if n_ci is None else n_ci[i].tolist()}
                for i, c in enumerate(budgets)]
  out["compute_optimal"] = optimal
  return out


def _family_loss(runs: pd.DataFrame, loss: str) -> float:
  return float((runs[f"{loss}_loss"].astype(float) * runs["exit_weight"]).sum())


def _measured_leverage(frame, fitted, options) -> list[dict]:
  """Measured EL = mean loss of the G size-matched dense models / the family's mean exit loss,
  next to the fitted law's prediction for the same N and D."""
  suffix = "_non_embedding" if options.param_count == "non_embedding" else ""
  ok = frame[frame["status"] == results.OK]
  dense = ok[ok["kind"] == DENSE_MATCH]
  out = []
  for family_id, matched in dense.groupby("matches"):
    family = ok[ok["run_id"] == family_id]
    g = int(matched["matched_G"].iloc[0])
    if family.empty or len(matched) != g:
      continue
    matched = matched.sort_values("matched_exit")
    family_loss = _family_loss(family, options.loss)
    dense_losses = matched[f"{options.loss}_loss"].astype(float).to_numpy()
    entry = {"family": family_id, "C": float(family["C"].iloc[0]), "G": g,
             "family_loss": family_loss, "dense_losses": dense_losses.tolist(),
             "measured": float(dense_losses.mean() / family_loss)}
    if fitted is not None:
      n_dense = matched[f"N_exit{suffix}"].to_numpy(float)
      d_dense = matched["D"].to_numpy(float)
      n_family = float(family[f"N_family{suffix}"].iloc[0])
      d_family = float(family["D"].iloc[0])

      def predicted(p):
        dense_loss = jnp.exp(laws.FAMILIAL.log_loss(
            p, {"N": jnp.asarray(n_dense), "D": jnp.asarray(d_dense), "G": jnp.ones(g)}))
        family_loss = jnp.exp(laws.FAMILIAL.log_loss(
            p, {"N": jnp.asarray([n_family]), "D": jnp.asarray([d_family]),
                "G": jnp.asarray([float(g)])}))[0]
        return jnp.mean(dense_loss) / family_loss

      value, ci = _with_interval(predicted, fitted.result.params, _log_samples(fitted))
      entry["law"] = float(value)
      entry["law_ci95"] = None if ci is None else ci.tolist()
    out.append(entry)
  return out


def _extrapolation(rows: pd.DataFrame, options) -> tuple[dict, pd.DataFrame | None]:
  """Refit the familial law without the largest budget; errors predicting that budget's runs."""
  budgets = np.sort(rows["C"].unique())
  if len(budgets) < 3:
    return {"skipped": "needs at least 3 budgets"}, None
  held_out = rows["C"] == budgets[-1]
  try:
    data = _data(rows[~held_out], laws.FAMILIAL, "the rows below the largest budget")
  except ValueError as e:
    return {"skipped": str(e)}, None
  result = fitlib.fit(laws.FAMILIAL, data, grid=laws.FAMILIAL.grid(options.grid_every))
  test = rows[held_out]
  with jax.enable_x64(True):
    predicted = np.asarray(laws.loss(laws.FAMILIAL, result.params, fitlib.as_data(
        {k: test[k].to_numpy(float) for k in ("N", "D", "G")})))
  error = predicted / test["loss"].to_numpy(float) - 1
  out = rows.assign(held_out=held_out, predicted=np.nan)
  out.loc[held_out, "predicted"] = predicted
  return {"held_out_budget": float(budgets[-1]), "n_fit_rows": int((~held_out).sum()),
          "n_held_out": int(held_out.sum()),
          "params": laws.to_natural_params(result.params),
          "mean_abs_relative_error": float(np.mean(np.abs(error))),
          "max_abs_relative_error": float(np.max(np.abs(error))),
          "mean_relative_error": float(np.mean(error))}, out


def _edges(rows: pd.DataFrame) -> list[dict]:
  """Per (C, G): the size with the lowest loss (mean over seeds), and whether it is the
  smallest or the largest size trained (a valley the sizes did not bracket)."""
  out = []
  for (c, g), curve in rows.groupby(["C", "G"]):
    by_size = curve.groupby("N")["loss"].mean().sort_index()
    if len(by_size) < 2:
      continue
    best = int(np.argmin(by_size.to_numpy()))
    where = ("smallest" if best == 0 else "largest" if best == len(by_size) - 1 else "interior")
    out.append({"C": float(c), "G": int(g), "best_N": float(by_size.index[best]),
                "best_loss": float(by_size.iloc[best]), "minimum_at": where,
                "n_sizes": len(by_size)})
  return out


def _runs(frame: pd.DataFrame, plan: dict | None) -> dict:
  by_run = frame.groupby("run_id").agg(status=("status", "first"), error=("error", "first"))
  planned = [r["run_id"] for r in plan["runs"]] if plan else list(by_run.index)
  failed = {i: e for i, (s, e) in by_run.iterrows() if s == results.FAILED}
  return {"planned": len(planned), "finished": int((by_run["status"] == results.OK).sum()),
          "failed": failed, "missing": sorted(set(planned) - set(by_run.index)),
          "dropped": plan.get("dropped", []) if plan else []}


def analyze(frame: pd.DataFrame, options: Options = Options(), plan: dict | None = None,
            progress: bool = False) -> Analysis:
  """Fits, leverage, extrapolation and edge checks of a study's collected records."""
  rows = {name: results.law_rows(frame, name, loss=options.loss,
                                 param_count=options.param_count) for name in LAW_OBJECTS}
  fits, skipped = _fit_laws(rows, options, progress)
  report = {"options": dataclasses.asdict(options), "runs": _runs(frame, plan),
            "laws": {name: f.record for name, f in fits.items()}, "skipped_laws": skipped,
            "edges": _edges(rows["familial"])}
  familial = fits.get("familial")
  if familial is not None:
    budgets = sorted(rows["familial"]["C"].unique().tolist())
    granularities = sorted(int(g) for g in rows["familial"]["G"].unique())
    report["from_law"] = _leverage_from_law(familial, budgets, granularities)
  report["measured_leverage"] = _measured_leverage(frame, familial, options)
  report["extrapolation"], extrapolation_rows = _extrapolation(rows["familial"], options)
  if plan:
    report["plan"] = plan
  return Analysis(report, rows, fits, frame, extrapolation_rows)


def write(study_dir: str | Path, analysis: Analysis) -> dict[str, Path]:
  """report.json, report.md, the PNG plots and the fit-ready tables (STUDY/data/)."""
  study_dir = Path(study_dir)
  figures = plots.draw_all(study_dir / "plots", analysis)
  options = analysis.report["options"]
  tables = results.export(analysis.frame, study_dir / "data", loss=options["loss"],
                          param_count=options["param_count"])
  atomic_write_text(study_dir / "report.json", json.dumps(_strict(analysis.report), indent=1,
                                                          default=_json_default))
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
  for key in record.ORDER:
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
    t = law["gamma_test"]
    lines.append(f"\nIs gamma > 0? likelihood-ratio p = {_fmt(t['lrt_p'], 3)}"
                 + (f", bootstrap p = {_fmt(t['bootstrap_p'], 3)}" if "bootstrap_p" in t else ""))
  return lines


def _from_law_lines(from_law: dict) -> list[str]:
  lines = []
  if "leverage" in from_law:
    lines += ["", "## Efficiency Leverage from the familial law (C = 6ND, exits g/G of N*)", "",
              "| C | G | EL | 95% interval |", "|---|---|---|---|"]
    lines += [f"| {e['C']:.3g} | {e['G']} | {_fmt(e['EL'])} | {_ci(e['ci95'])} |"
              for e in from_law["leverage"]]
  lines += ["", "## Compute-optimal model size N*(C) per G", "",
            "| C | G | N* | 95% interval | D* |", "|---|---|---|---|---|"]
  lines += [f"| {e['C']:.3g} | {e['G']} | {_fmt(e['N_opt'])} | {_ci(e['ci95'])} | "
            f"{_fmt(e['D_opt'])} |" for e in from_law["compute_optimal"]]
  return lines


def _measured_leverage_lines(measured: list) -> list[str]:
  lines = ["", "## Measured Efficiency Leverage (G size-matched dense models, C/G each)", "",
           "| family | C | G | family loss | dense losses | measured EL | law EL | 95% interval |",
           "|---|---|---|---|---|---|---|---|"]
  for e in measured:
    dense = ", ".join(_fmt(x) for x in e["dense_losses"])
    lines.append(f"| `{e['family']}` | {e['C']:.3g} | {e['G']} | {_fmt(e['family_loss'])} | "
                 f"{dense} | {_fmt(e['measured'])} | {_fmt(e.get('law'))} | "
                 f"{_ci(e.get('law_ci95'))} |")
  return lines


def _checks_lines(extrapolation: dict, edges: list) -> list[str]:
  lines = ["", "## Extrapolation check", ""]
  if "skipped" in extrapolation:
    lines.append(f"Not run: {extrapolation['skipped']}")
  else:
    lines.append(
        f"Familial law refitted without the largest budget (C = "
        f"{extrapolation['held_out_budget']:.3g}, {extrapolation['n_held_out']} runs held out): "
        f"mean absolute relative error {extrapolation['mean_abs_relative_error']:.2%}, "
        f"max {extrapolation['max_abs_relative_error']:.2%}, mean signed "
        f"{extrapolation['mean_relative_error']:+.2%}.")
  lines += ["", "## IsoFLOP minima", "", "| C | G | best N | loss | minimum at |",
            "|---|---|---|---|---|"]
  for e in edges:
    flag = e["minimum_at"] + ("" if e["minimum_at"] == "interior" else " (not bracketed)")
    lines.append(f"| {e['C']:.3g} | {e['G']} | {_fmt(e['best_N'])} | {_fmt(e['best_loss'])} | "
                 f"{flag} |")
  return lines


def markdown(report: dict, figures: dict, study_dir: Path) -> str:
  """The tables a person reads, with the plots linked."""
  runs = report["runs"]
  lines = ["# IsoFLOP study report", "",
           f"Runs: {runs['finished']} finished of {runs['planned']} planned, "
           f"{len(runs['failed'])} failed, {len(runs['missing'])} not yet run; "
           f"{len(runs['dropped'])} dropped at planning. Loss fitted: {report['options']['loss']}; "
           f"N = {report['options']['param_count'].replace('_', '-')} parameters.", ""]
  for run_id, error in runs["failed"].items():
    lines.append(f"- failed: `{run_id}`: {error.splitlines()[0][:200]}")
  for name, law in report["laws"].items():
    lines += _law_lines(name, law)
  for name, why in report["skipped_laws"].items():
    lines.append(f"\n{name} law not fitted: {why}")
  if "from_law" in report:
    lines += _from_law_lines(report["from_law"])
  if report["measured_leverage"]:
    lines += _measured_leverage_lines(report["measured_leverage"])
  lines += _checks_lines(report["extrapolation"], report["edges"])
  if figures:
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({path.relative_to(study_dir)})" for name, path in figures.items()]
  return "\n".join(lines) + "\n"


class LiveFit:
  """Refits the familial law each time a run finishes, from the previous estimate and a thin
  grid (rows are padded to size buckets, so a growing study compiles a few programs, not one per
  run), and prints the current estimates."""

  def __init__(self, study_dir, options: Options, fingerprint: str | None = None,
               grid_every: int = 50):
    self.study_dir, self.options, self.fingerprint = study_dir, options, fingerprint
    self.grid = laws.FAMILIAL.grid(grid_every)
    self.params: dict | None = None

  def __call__(self, spec=None, records=None) -> str | None:
    if spec is not None and spec.kind != ISOFLOP:
      return None  # the law's rows did not change
    frame = results.collect(self.study_dir, self.fingerprint)
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
