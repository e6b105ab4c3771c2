"""Gamma measured without the law, from a study's gamma grid (famjax.study.isoflop: GRID families
and EXIT_CONTROL dense runs, StudyConfig.grid_widths x grid_tokens).

- gamma_direct, per cell (width, D): the least-squares slope of log(mean exit loss) on log G over
  the cell's families (one backbone, the same tokens), with one intercept per seed (a seed's
  batches are the same for every G). Its 95% interval is the slope's t interval: it rests on how
  the seeds' losses scatter about a line in log G.
- Its split, per cell: `size`, the same slope of the mean loss of dense controls shaped like each
  exit (what exit size alone explains), and `sharing` = gamma_direct - size, the slope of the
  ratio of the two (what training the exits on one backbone costs). Same design, t intervals.
- One gamma for all cells is tested against a gamma per cell, per width and per D (nested least
  squares, F tests; intercepts per cell and seed in both).
- gamma against D (`trends`, for gamma, size and sharing): gamma = one per width + slope * x +
  curvature * x^2 with x = ln(D / the grid's geometric-mean D), in the same pooled regression
  (curvature only with at least three D values).
- The deepest exit's tax, per cell and G >= 2: the loss of the family's deepest exit over the
  G = 1 family (the dense backbone) of the same cell and seed, as a ratio - 1; its interval pools
  the seeds' scatter over every (cell, G).
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

from famjax.study import records
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
  size: Slope | None = None  # of the exit-shaped controls' mean loss (None: controls missing)
  sharing: Slope | None = None  # gamma - size


@dataclasses.dataclass(frozen=True)
class Trend:
  """How one part of gamma ("gamma", "size" or "sharing") changes with ln D."""
  part: str
  slope: Slope  # d gamma / d ln D at the grid's geometric-mean D
  curvature: Slope | None  # d^2 gamma / d (ln D)^2 / 2 (None: fewer than three D values)
  d_reference: float  # the geometric-mean D where `slope` applies


@dataclasses.dataclass(frozen=True)
class Tax:
  """The deepest exit of a G-exit family over the dense backbone (G = 1): same cell and seed."""
  d_model: int
  D: int
  G: int
  n_seeds: int
  ratio: float  # exp(mean over seeds of log(L_deepest / L_dense)) - 1
  ci95: tuple[float, float]  # of the ratio - 1 (t interval, pooled over every cell and G)


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
  trends: list[Trend] = dataclasses.field(default_factory=list)
  tax: list[Tax] = dataclasses.field(default_factory=list)
  shared_by_loss: dict[str, Slope] = dataclasses.field(default_factory=dict)  # val and train


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


def _ok(frame: pd.DataFrame) -> pd.DataFrame:
  return frame[frame["status"] == records.OK]


def dense_controls(frame: pd.DataFrame, loss: str,
                   kinds: tuple[str, ...] = (GRID, EXIT_CONTROL)) -> pd.DataFrame:
  """Finished dense runs of these kinds (the grid's: G = 1 families and exit controls) by
  CONTROL_KEY, their loss as control_loss."""
  ok = _ok(frame)
  dense = ok[ok["kind"].isin(kinds) & (ok["G"] == 1)]
  return dense[CONTROL_KEY + [f"{loss}_loss"]].rename(columns={f"{loss}_loss": "control_loss"})


CONTROL_KEY = ["d_model", "D", "seed", "N_exit_non_embedding"]  # an exit and its dense control


def family_rows(frame: pd.DataFrame, loss: str = "val") -> pd.DataFrame:
  """One row per finished grid family: d_model, D, G, seed, loss (mean exit loss) and
  size_loss (the same mean over the exits' dense controls; NaN where one is missing)."""
  done = _ok(frame)
  done = done[done["kind"] == GRID]
  done = done.merge(dense_controls(frame, loss), on=CONTROL_KEY, how="left")
  weighted = done.assign(weighted=pd.to_numeric(done[f"{loss}_loss"]) * done["exit_weight"],
                         size=pd.to_numeric(done["control_loss"]) * done["exit_weight"])
  return weighted.groupby("run_id").agg(
      d_model=("d_model", "first"), D=("D", "first"), G=("G", "first"), seed=("seed", "first"),
      loss=("weighted", _sum_of_all), size_loss=("size", _sum_of_all)).reset_index()


def _sum_of_all(x: pd.Series) -> float:
  """The sum, or NaN where a value is missing (not the sum of the others)."""
  return x.sum(min_count=len(x))


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
  ok = _ok(frame)
  exits = ok[(ok["kind"] == GRID) & (ok["G"] >= 2)]
  paired = exits.merge(dense_controls(frame, loss), on=CONTROL_KEY)
  if len(paired) < 3:
    return None
  y = np.log(pd.to_numeric(paired[f"{loss}_loss"]).to_numpy(float)
             / pd.to_numeric(paired["control_loss"]).to_numpy(float))
  x = np.log1p(paired[["P", "Q"]].to_numpy(float))
  coef, _, df, cov = _least_squares(x, y)
  return BranchControls(len(paired), _slope(coef, cov, df, 0), _slope(coef, cov, df, 1))


PARTS = {"gamma": lambda r: np.log(r["loss"]), "size": lambda r: np.log(r["size_loss"]),
         "sharing": lambda r: np.log(r["loss"] / r["size_loss"])}  # responses regressed on log G


def _cell_slope(cell: pd.DataFrame, part: str) -> Slope | None:
  y = PARTS[part](cell).to_numpy(float)
  if not np.isfinite(y).all():
    return None
  coef, _, df, cov = _least_squares(_design(cell, None), y)
  return _slope(coef, cov, df, 0)


def trend(rows: pd.DataFrame, part: str) -> Trend | None:
  """gamma's `part` against ln D (module docstring), or None with fewer than two D values."""
  y = PARTS[part](rows)
  rows, y = rows[np.isfinite(y)], y[np.isfinite(y)].to_numpy(float)
  tokens = np.log(rows["D"].to_numpy(float))
  n_tokens = rows["D"].nunique()
  if n_tokens < 2:
    return None
  reference = float(np.exp(np.mean(np.log(np.unique(rows["D"].to_numpy(float))))))
  x = tokens - np.log(reference)
  log_g = np.log(rows["G"].to_numpy(float))
  terms = [log_g * x] + ([log_g * x ** 2] if n_tokens >= 3 else [])
  design = np.hstack([np.stack(terms, axis=1), _design(rows, "d_model")])
  coef, _, df, cov = _least_squares(design, y)
  if df <= 0:
    return None
  curvature = _slope(coef, cov, df, 1) if n_tokens >= 3 else None
  return Trend(part, _slope(coef, cov, df, 0), curvature, reference)


def deepest_exit_tax(frame: pd.DataFrame, loss: str = "val") -> list[Tax]:
  """The deepest exit's loss over the dense backbone's, per cell and G >= 2 (module docstring)."""
  ok = _ok(frame)
  grid = ok[ok["kind"] == GRID]
  deepest = grid[(grid["G"] >= 2) & (grid["exit"] == grid["G"])]
  dense = grid[grid["G"] == 1][["d_model", "D", "seed", f"{loss}_loss"]]
  paired = deepest.merge(dense, on=["d_model", "D", "seed"], suffixes=("", "_dense"))
  if paired.empty:
    return []
  y = np.log(pd.to_numeric(paired[f"{loss}_loss"]).to_numpy(float)
             / pd.to_numeric(paired[f"{loss}_loss_dense"]).to_numpy(float))
  groups = paired["d_model"].astype(str) + "_" + paired["D"].astype(str) + "_" + \
      paired["G"].astype(str)
  dummies = pd.get_dummies(groups)
  coef, _, df, cov = _least_squares(dummies.to_numpy(float), y)
  taxes = []
  for k, label in enumerate(dummies.columns):
    width, tokens, g = (int(v) for v in label.split("_"))
    s = _slope(coef, cov, df, k)
    taxes.append(Tax(width, tokens, g, int((groups == label).sum()), float(np.expm1(s.estimate)),
                     tuple(float(v) for v in np.expm1(s.ci95))))
  return sorted(taxes, key=lambda t: (t.d_model, t.D, t.G))


def _shared(rows: pd.DataFrame):
  """One gamma for every cell (intercepts per cell and seed): the slope, RSS and df."""
  coef, rss, df, cov = _least_squares(_design(rows, None), np.log(rows["loss"].to_numpy(float)))
  return _slope(coef, cov, df, 0), rss, df


def measure_grid(frame: pd.DataFrame, loss: str = "val") -> GammaGrid | None:
  """The gamma grid's findings, or None where the study has no (finished) grid."""
  rows = family_rows(frame, loss).dropna(subset=["loss"])
  if rows.empty or rows["G"].nunique() < 2:
    return None
  shared, shared_rss, shared_df = _shared(rows)
  by_loss = {}
  for other in ("val", "train"):
    if f"{other}_loss" not in frame:
      continue
    other_rows = rows if other == loss else family_rows(frame, other).dropna(subset=["loss"])
    if other_rows["G"].nunique() >= 2:
      by_loss[other] = _shared(other_rows)[0]
  cells = []
  for (width, tokens), cell in rows.groupby(CELL):
    if cell["G"].nunique() < 2:
      continue
    cells.append(GammaCell(int(width), int(tokens), len(cell), _cell_slope(cell, "gamma"),
                           _cell_slope(cell, "size"), _cell_slope(cell, "sharing")))
  trends = [t for t in (trend(rows, part) for part in PARTS) if t is not None]
  rows = rows.assign(cell=rows["d_model"].astype(str) + "_" + rows["D"].astype(str))
  tests = [_homogeneity(rows, per, shared_rss, shared_df) for per in ("cell", "d_model", "D")]
  return GammaGrid(shared, cells, [t for t in tests if t is not None],
                   branch_controls(frame, loss), trends, deepest_exit_tax(frame, loss), by_loss)
