"""Exits decoupled from G (study.placements; famjax.study.isoflop: PLACEMENT families and their
PLACEMENT_CONTROL dense runs): every exit's loss over the dense control of its own shape (same
width, tokens and seed), as y = log(L_exit / L_control), regressed with no intercept on

- the branch law's two terms, log(1 + P) and log(1 + Q) (P exits above the exit, Q below):
  alpha_b and beta_b;
- one term, log G: every exit of a G-exit family pays G^c over its own shape.

Intervals are bootstrap percentiles over runs, in two stages: seeds are resampled (a seed's
controls serve every exit of that seed, so their noise is shared), then within each drawn seed
its families are resampled whole, with all their exits (an exit's errors are not independent of
its family's other exits); each resample is refitted by weighted least squares. With S seeds the
resampled seeds' spread is (S - 1) / S of the unbiased one, which at S = 3 matters: the
percentile interval is widened about the estimate by sqrt(S / (S - 1)) (docs/statistics.md gives
the coverage measured with and without).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from famjax.analysis.gamma_grid import CONTROL_KEY, dense_controls
from famjax.study import records
from famjax.study.isoflop import PLACEMENT, PLACEMENT_CONTROL


@dataclasses.dataclass(frozen=True)
class Coefficient:
  estimate: float
  ci95: tuple[float, float]  # bootstrap percentile interval over runs, widened (module doc)


@dataclasses.dataclass(frozen=True)
class ExitExcess:
  """One exit position of one placement, over seeds."""
  placement: str  # its family's exit layers, "1,2,4"
  exit_layer: int
  P: int
  Q: int
  n_seeds: int
  excess: float  # exp(mean over seeds of log(L_exit / L_control)) - 1


@dataclasses.dataclass(frozen=True)
class Placements:
  n_families: int
  n_exits: int
  n_bootstrap: int
  alpha_b: Coefficient  # on log(1 + P)
  beta_b: Coefficient  # on log(1 + Q)
  one_exponent: Coefficient  # on log G
  rss_two: float  # residual sum of squares, branch terms
  rss_one: float  # residual sum of squares, log G
  exits: list[ExitExcess]


def paired_exits(frame: pd.DataFrame, loss: str = "val") -> pd.DataFrame:
  """Every finished placement exit beside its control's loss (column control_loss)."""
  exits = frame[(frame["status"] == records.OK) & (frame["kind"] == PLACEMENT)]
  controls = dense_controls(frame, loss, (PLACEMENT_CONTROL,))
  paired = exits.merge(controls, on=CONTROL_KEY)
  return paired.assign(y=np.log(pd.to_numeric(paired[f"{loss}_loss"]).to_numpy(float)
                                / pd.to_numeric(paired["control_loss"]).to_numpy(float)))


def _weighted_fits(x_EK: np.ndarray, y_E: np.ndarray, weights_BE: np.ndarray) -> np.ndarray:
  """[B, K] least-squares coefficients, one fit per row of exit weights (NaN for a resample
  whose exits do not determine them)."""
  xtx_BKK = np.einsum("be,ek,el->bkl", weights_BE, x_EK, x_EK)
  xty_BK = np.einsum("be,ek,e->bk", weights_BE, x_EK, y_E)
  coef_BK = np.einsum("bkl,bl->bk", np.linalg.pinv(xtx_BKK), xty_BK)
  full_rank_B = np.linalg.matrix_rank(xtx_BKK) == x_EK.shape[1]
  return np.where(full_rank_B[:, None], coef_BK, np.nan)


def _coefficients(x_EK, y_E, weights_BE, widen: float) -> tuple[list[Coefficient], float]:
  full = _weighted_fits(x_EK, y_E, np.ones((1, len(y_E))))[0]
  refits_BK = _weighted_fits(x_EK, y_E, weights_BE)
  refits_BK = refits_BK[np.isfinite(refits_BK).all(axis=1)]  # a resample without rank
  lo, hi = full + widen * (np.percentile(refits_BK, [2.5, 97.5], axis=0) - full)
  rss = float(np.sum((y_E - x_EK @ full) ** 2))
  return [Coefficient(float(full[k]), (float(lo[k]), float(hi[k]))) for k in range(len(full))], rss


def _two_stage_counts(seed_F: np.ndarray, n_bootstrap: int, seed: int) -> np.ndarray:
  """[B, F] how often each family is drawn: seeds with replacement, then each drawn seed's
  families with replacement."""
  rng = np.random.default_rng(seed)
  seeds = np.unique(seed_F)
  counts_BF = np.zeros((n_bootstrap, len(seed_F)))
  for b in range(n_bootstrap):
    for drawn in rng.choice(seeds, len(seeds)):
      members = np.flatnonzero(seed_F == drawn)
      np.add.at(counts_BF[b], rng.choice(members, len(members)), 1)
  return counts_BF


def _excess_table(paired: pd.DataFrame) -> list[ExitExcess]:
  placement = paired.groupby("run_id")["exit_layer"].transform(
      lambda layers: ",".join(str(int(l)) for l in sorted(layers)))
  out = []
  for (where, layer), group in paired.assign(placement=placement).groupby(
      ["placement", "exit_layer"], sort=False):
    out.append(ExitExcess(where, int(layer), int(group["P"].iloc[0]), int(group["Q"].iloc[0]),
                          int(group["seed"].nunique()), float(np.expm1(group["y"].mean()))))
  return sorted(out, key=lambda e: (len(e.placement), e.placement, e.exit_layer))


def measure_placements(frame: pd.DataFrame, loss: str = "val", n_bootstrap: int = 2000,
            seed: int = 0) -> Placements | None:
  """The placement families' findings, or None where the study has fewer than three exits
  with controls."""
  paired = paired_exits(frame, loss)
  paired = paired[paired["G"] >= 2]
  if len(paired) < 3 or n_bootstrap < 1:
    return None
  families, family_E = np.unique(paired["run_id"].to_numpy(), return_inverse=True)
  seed_F = paired.groupby("run_id")["seed"].first().loc[families].to_numpy()
  weights_BE = _two_stage_counts(seed_F, n_bootstrap, seed)[:, family_E]
  y_E = paired["y"].to_numpy(float)
  n_seeds = len(np.unique(seed_F))
  widen = np.sqrt(n_seeds / (n_seeds - 1)) if n_seeds > 1 else 1.0
  branch, rss_two = _coefficients(np.log1p(paired[["P", "Q"]].to_numpy(float)), y_E, weights_BE,
                                  widen)
  (one,), rss_one = _coefficients(np.log(paired[["G"]].to_numpy(float)), y_E, weights_BE, widen)
  return Placements(len(families), len(paired), n_bootstrap, branch[0], branch[1], one,
                    rss_two, rss_one, _excess_table(paired))
