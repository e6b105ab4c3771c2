"""Gamma measured without the law, from a study's gamma grid (famjax.study.isoflop: GRID families
and EXIT_CONTROL dense runs, StudyConfig.grid_widths x grid_tokens).

- gamma_direct, per cell (width, D): the least-squares slope of log(mean exit loss) on log G over
  the cell's families (one backbone, the same tokens), with one intercept per seed (a seed's
  batches are the same for every G). Its 95% interval is the slope's t interval: it rests on how
  the seeds' losses scatter about a line in log G.
- One gamma for all cells is tested against a gamma per cell, per width and per D (nested least
  squares, F tests; intercepts per cell and seed in both).
- Branch exponents with controls: for every exit of a G >= 2 family, log(L_exit / L_control),
  the control being the dense model with the exit's sub-model shape (its depth, the family's
  width) trained on the same tokens with the same seed, regressed on log(1+P) and log(1+Q) with
  no intercept: alpha_b and beta_b with the dense term measured on the exits' own shapes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from scipy import stats

from famjax.study import results
from famjax.study.isoflop import EXIT_CONTROL, GRID

CELL = ["d_model", "D"]


@dataclasses.dataclass(frozen=True)
class Slope:
  estimate: float
  se: float
  ci95: tuple[float, float]
  df: int  # residual degrees of freedom of its t interval


@dataclasses.dataclass(frozen=True)
class GammaCell:
  d_model: int
  D: int
  n_families: int  # one per (G, seed)
  gamma: Slope


@dataclasses.dataclass(frozen=True)
class Homogeneity:
  """One gamma for every cell against one per group (`per`: cell, width or D)."""
  per: str
  n_groups: int
  f: float
  df: tuple[int, int]
  p: float


@dataclasses.dataclass(frozen=True)
class BranchControls:
  n_exits: int  # exit rows with a control
  alpha_b: Slope  # on log(1 + P), P exits above
  beta_b: Slope  # on log(1 + Q), Q exits below


@dataclasses.dataclass(frozen=True)
class GammaGrid:
  shared: Slope  # one gamma for all cells (intercepts per cell and seed)
  cells: list[GammaCell]
  homogeneity: list[Homogeneity]
  branch: BranchControls | None


def _least_squares(x_RK: np.ndarray, y_R: np.ndarray):
  """Coefficients, residual sum of squares, residual df and the coefficients' covariance."""
  coef_K, *_ = np.linalg.lstsq(x_RK, y_R, rcond=None)
  rank = np.linalg.matrix_rank(x_RK)
  rss = float(np.sum((y_R - x_RK @ coef_K) ** 2))
  df = len(y_R) - rank
  cov_KK = np.linalg.pinv(x_RK.T @ x_RK) * (rss / df if df > 0 else np.nan)
  return coef_K, rss, df, cov_KK


def _slope(coef_K, cov_KK, df, k) -> Slope:
  se = float(np.sqrt(cov_KK[k, k]))
  half = float(stats.t.ppf(0.975, df)) * se if df > 0 else np.nan
  return Slope(float(coef_K[k]), se, (float(coef_K[k] - half), float(coef_K[k] + half)), int(df))


def _dummies(labels: pd.Series) -> np.ndarray:
  return pd.get_dummies(labels.astype(str)).to_numpy(float)


def family_rows(frame: pd.DataFrame, loss: str = "val") -> pd.DataFrame:
  """One row per finished grid family: d_model, D, G, seed, loss (mean exit loss)."""
  done = frame[(frame["kind"] == GRID) & (frame["status"] == results.OK)]
  weighted = done.assign(weighted=pd.to_numeric(done[f"{loss}_loss"]) * done["exit_weight"])
  return weighted.groupby("run_id").agg(
      d_model=("d_model", "first"), D=("D", "first"), G=("G", "first"), seed=("seed", "first"),
      loss=("weighted", "sum")).reset_index()


def _design(rows: pd.DataFrame, per: str | None) -> np.ndarray:
  """Intercepts per (cell, seed) and log G, shared or one slope per group of `per`."""
  intercepts = _dummies(rows["d_model"].astype(str) + "_" + rows["D"].astype(str) + "_"
                        + rows["seed"].astype(str))
  log_g = np.log(rows["G"].to_numpy(float))[:, None]
  slopes = log_g if per is None else _dummies(rows[per]) * log_g
  return np.hstack([slopes, intercepts])


def _homogeneity(rows: pd.DataFrame, per: str, shared_rss: float, shared_df: int):
  groups = rows[per].nunique()
  if groups < 2:
    return None
  _, rss, df, _ = _least_squares(_design(rows, per), np.log(rows["loss"].to_numpy(float)))
  if df <= 0 or shared_df <= df:
    return None
  f = ((shared_rss - rss) / (shared_df - df)) / (rss / df)
  return Homogeneity(per, int(groups), float(f), (int(shared_df - df), int(df)),
                     float(stats.f.sf(f, shared_df - df, df)))


def branch_controls(frame: pd.DataFrame, loss: str = "val") -> BranchControls | None:
  """alpha_b, beta_b from exits over their dense controls (module docstring)."""
  ok = frame[frame["status"] == results.OK]
  exits = ok[(ok["kind"] == GRID) & (ok["G"] >= 2)]
  controls = ok[ok["kind"].isin([GRID, EXIT_CONTROL]) & (ok["G"] == 1)]
  key = ["d_model", "D", "seed", "N_exit_non_embedding"]
  paired = exits.merge(controls[key + [f"{loss}_loss"]], on=key, suffixes=("", "_control"))
  if len(paired) < 3:
    return None
  y = np.log(pd.to_numeric(paired[f"{loss}_loss"]).to_numpy(float)
             / pd.to_numeric(paired[f"{loss}_loss_control"]).to_numpy(float))
  x = np.log1p(paired[["P", "Q"]].to_numpy(float))
  coef, _, df, cov = _least_squares(x, y)
  return BranchControls(len(paired), _slope(coef, cov, df, 0), _slope(coef, cov, df, 1))


def analyze(frame: pd.DataFrame, loss: str = "val") -> GammaGrid | None:
  """The gamma grid's findings, or None where the study has no (finished) grid."""
  rows = family_rows(frame, loss)
  if rows.empty or rows["G"].nunique() < 2:
    return None
  log_loss = np.log(rows["loss"].to_numpy(float))
  coef, shared_rss, shared_df, cov = _least_squares(_design(rows, None), log_loss)
  cells = []
  for (width, tokens), cell in rows.groupby(CELL):
    if cell["G"].nunique() < 2:
      continue
    log_cell = np.log(cell["loss"].to_numpy(float))
    c_coef, _, c_df, c_cov = _least_squares(_design(cell, None), log_cell)
    cells.append(GammaCell(int(width), int(tokens), len(cell), _slope(c_coef, c_cov, c_df, 0)))
  rows = rows.assign(cell=rows["d_model"].astype(str) + "_" + rows["D"].astype(str))
  tests = [_homogeneity(rows, per, shared_rss, shared_df) for per in ("cell", "d_model", "D")]
  return GammaGrid(_slope(coef, cov, shared_df, 0), cells, [t for t in tests if t is not None],
                   branch_controls(frame, loss))
