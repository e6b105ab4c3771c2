"""Measured Efficiency Leverage: each family of a leverage point against its G size-matched dense
models, and, per (C, G), the family nearest the familial law's N*(C) over its seeds."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.stats

from famjax.scaling import laws
from famjax.study import records
from famjax.study.isoflop import DENSE_MATCH


def optional():
  """A report field left out of report.json when None (report._json)."""
  return dataclasses.field(default=None, metadata={"optional": True})


@dataclasses.dataclass(frozen=True)
class MeasuredLeverage:
  family: str  # the family's run id
  C: float
  G: int
  family_loss: float
  dense_losses: list[float]
  measured: float
  law: float | None = optional()  # the familial law's EL for the same N and D
  law_ci95: list[float] | None = optional()
  N_family: float | None = optional()  # the family's N (the report's definition)
  seed: int | None = optional()


@dataclasses.dataclass(frozen=True)
class LeverageAtOptimum:
  """Measured EL at (C, G) of the family nearest the fitted N*(C) in log N, among the widths
  whose families have dense models for the most seeds; the interval is Student's t over seeds."""
  C: float
  G: int
  N_opt: float  # the familial law's N*(C) for this G
  N_family: float  # the chosen family's N
  families: list[str]  # its run id per seed
  measured: list[float]  # its measured EL per seed
  mean: float
  ci95: list[float] | None = optional()  # None: one seed
  law: float | None = optional()  # the law's EL for the chosen family's N and D
  law_ci95: list[float] | None = optional()


def _family_loss(runs: pd.DataFrame, loss: str) -> float:
  return float((runs[f"{loss}_loss"].astype(float) * runs["exit_weight"]).sum())


def measured(frame, config, law_interval=None) -> list[MeasuredLeverage]:
  """Measured EL = mean loss of the G size-matched dense models / the family's mean exit loss,
  next to the fitted law's prediction for the same N and D: law_interval(fn) gives fn of the
  familial fit's parameters and its bootstrap interval (None: no familial fit)."""
  suffix = "_non_embedding" if config.param_count == "non_embedding" else ""
  ok = frame[frame["status"] == records.OK]
  dense = ok[ok["kind"] == DENSE_MATCH]
  out = []
  for family_id, matched in dense.groupby("matches"):
    family = ok[ok["run_id"] == family_id]
    g = int(matched["matched_G"].iloc[0])
    if family.empty or len(matched) != g:
      continue
    matched = matched.sort_values("matched_exit")
    family_loss = _family_loss(family, config.fit_loss)
    dense_losses = matched[f"{config.fit_loss}_loss"].astype(float).to_numpy()
    n_family = float(family[f"N_family{suffix}"].iloc[0])
    entry = MeasuredLeverage(family_id, float(family["C"].iloc[0]), g, family_loss,
                             dense_losses.tolist(), float(dense_losses.mean() / family_loss),
                             N_family=n_family, seed=int(family["seed"].iloc[0]))
    if law_interval is not None:
      value, ci = law_interval(_predicted(matched, n_family, float(family["D"].iloc[0]), g,
                                          suffix))
      entry = dataclasses.replace(entry, law=float(value),
                                  law_ci95=None if ci is None else ci.tolist())
    out.append(entry)
  return out


def _predicted(matched, n_family: float, d_family: float, g: int, suffix: str):
  """The law's EL for these dense models and this family, as a function of its parameters."""
  n_dense = jnp.asarray(matched[f"N_exit{suffix}"].to_numpy(float))
  d_dense = jnp.asarray(matched["D"].to_numpy(float))

  def predicted(p):
    dense_loss = jnp.exp(laws.FAMILIAL.log_loss(p, {"N": n_dense, "D": d_dense,
                                                    "G": jnp.ones(g)}))
    family_loss = jnp.exp(laws.FAMILIAL.log_loss(
        p, {"N": jnp.asarray([n_family]), "D": jnp.asarray([d_family]),
            "G": jnp.asarray([float(g)])}))[0]
    return jnp.mean(dense_loss) / family_loss
  return predicted


def at_optimum(entries: list[MeasuredLeverage], optimal) -> list[LeverageAtOptimum]:
  """Per (C, G) with measured families and a fitted N*(C) (report.ComputeOptimal entries)."""
  n_opt = {(o.C, o.G): o.N_opt for o in optimal}
  out = []
  for (c, g) in sorted({(e.C, e.G) for e in entries}):
    if (c, g) not in n_opt:
      continue
    by_size: dict[float, list[MeasuredLeverage]] = {}
    for e in entries:
      if (e.C, e.G) == (c, g):
        by_size.setdefault(e.N_family, []).append(e)
    most = max(len(group) for group in by_size.values())
    size = min((n for n, group in by_size.items() if len(group) == most),
               key=lambda n: abs(np.log(n / n_opt[c, g])))
    group = sorted(by_size[size], key=lambda e: e.seed)
    values = np.array([e.measured for e in group])
    ci = None
    if len(values) > 1:
      half = scipy.stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
      ci = [float(values.mean() - half), float(values.mean() + half)]
    out.append(LeverageAtOptimum(c, g, float(n_opt[c, g]), float(size),
                                 [e.family for e in group], values.tolist(),
                                 float(values.mean()), ci, group[0].law, group[0].law_ci95))
  return out
