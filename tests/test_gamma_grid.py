"""gamma measured without the law, and the branch exponents over exit-shaped controls, from
synthetic records whose answers are known."""

import itertools

import numpy as np
import pandas as pd
import pytest

from famjax.analysis import gamma_grid
from famjax.study.isoflop import EXIT_CONTROL, GRID


def _families(gamma_of_width, seed_noise=0.003, rng_seed=0):
  """One record per family (its mean exit loss as exit 1, weight 1): loss = base(cell) *
  G^gamma(width) * seed noise."""
  rng = np.random.default_rng(rng_seed)
  rows = []
  for width, tokens, seed in itertools.product((32, 64), (10**6, 4 * 10**6), (0, 1)):
    base = 3.0 * (width / 32) ** -0.1 * (tokens / 1e6) ** -0.05
    for g in (1, 2, 4):
      rows.append({"run_id": f"d{width}_D{tokens}_G{g}_s{seed}", "kind": GRID, "status": "ok",
                   "d_model": width, "D": tokens, "G": g, "seed": seed, "exit": 1, "P": 0,
                   "Q": g - 1, "N_exit_non_embedding": 1000 * g, "exit_weight": 1.0,
                   "val_loss": base * g ** gamma_of_width(width)
                   * np.exp(seed_noise * rng.standard_normal())})
  return pd.DataFrame(rows)


def test_gamma_direct_recovers_a_shared_gamma_and_does_not_reject_it():
  grid = gamma_grid.analyze(_families(lambda w: 0.03))
  assert len(grid.cells) == 4 and all(c.n_families == 6 for c in grid.cells)
  for cell in grid.cells:
    assert cell.gamma.ci95[0] < 0.03 < cell.gamma.ci95[1]
    assert cell.gamma.df == 6 - 2 - 1  # 6 families, 2 seed intercepts, 1 slope
  assert grid.shared.estimate == pytest.approx(0.03, abs=0.005)
  assert {t.per for t in grid.homogeneity} == {"cell", "d_model", "D"}
  assert all(t.p > 0.01 for t in grid.homogeneity)


def test_a_gamma_that_changes_with_width_is_detected():
  grid = gamma_grid.analyze(_families(lambda w: 0.01 if w == 32 else 0.05))
  by = {t.per: t for t in grid.homogeneity}
  assert by["d_model"].p < 1e-4 and by["d_model"].df[0] == 1
  assert by["D"].p > 0.01  # gamma does not change with D here
  widths = {c.d_model: c.gamma.estimate for c in grid.cells}
  assert widths[32] == pytest.approx(0.01, abs=0.006)
  assert widths[64] == pytest.approx(0.05, abs=0.006)


def test_branch_exponents_over_controls_are_the_ratio_regression():
  """Each exit's loss = its control's loss * (1+P)^0.02 * (1+Q)^-0.03 (tiny noise)."""
  rng = np.random.default_rng(1)
  rows = []
  for seed, g_total in itertools.product((0, 1), (2, 4)):
    for g in range(1, g_total + 1):  # exits after layers 2, 4 (G = 2) and 1, 2, 3, 4 (G = 4)
      depth = g * 4 // g_total
      control = 3.0 - 0.1 * depth + 0.01 * seed
      loss = control * (1 + g - 1) ** 0.02 * (1 + g_total - g) ** -0.03
      rows.append({"run_id": f"G{g_total}_s{seed}", "kind": GRID, "status": "ok", "d_model": 32,
                   "D": 10**6, "seed": seed, "G": g_total, "exit": g, "P": g - 1,
                   "Q": g_total - g, "N_exit_non_embedding": 1000 * depth,
                   "val_loss": loss * np.exp(1e-5 * rng.standard_normal())})
  for seed, depth in itertools.product((0, 1), (1, 2, 3, 4)):
    kind = GRID if depth == 4 else EXIT_CONTROL  # the G = 1 family is the last exits' control
    rows.append({"run_id": f"c{depth}_s{seed}", "kind": kind, "status": "ok", "d_model": 32,
                 "D": 10**6, "seed": seed, "G": 1, "exit": 1, "P": 0, "Q": 0,
                 "N_exit_non_embedding": 1000 * depth, "val_loss": 3.0 - 0.1 * depth + 0.01 * seed})
  branch = gamma_grid.branch_controls(pd.DataFrame(rows))
  assert branch.n_exits == 2 * (2 + 4)
  assert branch.alpha_b.estimate == pytest.approx(0.02, abs=1e-4)
  assert branch.beta_b.estimate == pytest.approx(-0.03, abs=1e-4)
  assert branch.alpha_b.ci95[0] < 0.02 < branch.alpha_b.ci95[1]


def test_a_study_without_a_grid_has_no_gamma_grid():
  frame = _families(lambda w: 0.03).assign(kind="isoflop")
  assert gamma_grid.analyze(frame) is None
