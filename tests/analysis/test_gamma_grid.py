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
  grid = gamma_grid.measure_grid(_families(lambda w: 0.03))
  assert len(grid.cells) == 4 and all(c.n_families == 6 for c in grid.cells)
  for cell in grid.cells:
    assert cell.gamma.ci95[0] < 0.03 < cell.gamma.ci95[1]
    assert cell.gamma.df == 6 - 2 - 1  # 6 families, 2 seed intercepts, 1 slope
  assert grid.shared.estimate == pytest.approx(0.03, abs=0.005)
  assert {t.per for t in grid.homogeneity} == {"cell", "d_model", "D"}
  assert all(t.p > 0.01 for t in grid.homogeneity)


def test_a_gamma_that_changes_with_width_is_detected():
  grid = gamma_grid.measure_grid(_families(lambda w: 0.01 if w == 32 else 0.05))
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
  assert gamma_grid.measure_grid(frame) is None


def _grid_with_controls(sharing_of_tokens, noise=0.002, rng_seed=0):
  """A gamma grid with exit-shaped controls: a dense model of depth l (of 4) loses
  base(cell) * (l / 4)^-0.3 (times a seed effect), and every exit of a G-exit family loses its
  control's loss times G^sharing(D), so that the size part of gamma is the controls' slope and
  the sharing part is sharing(D) exactly (up to the runs' noise)."""
  rng = np.random.default_rng(rng_seed)
  rows = []
  noisy = lambda x: x * np.exp(noise * rng.standard_normal())
  for width, tokens, seed in itertools.product((32, 64), (10**6, 2 * 10**6, 4 * 10**6, 8 * 10**6),
                                               (0, 1)):
    base = 3.0 * (width / 32) ** -0.1 * (tokens / 1e6) ** -0.05 * np.exp(0.05 * seed)
    control = lambda depth: base * (depth / 4) ** -0.3
    cell = {"d_model": width, "D": tokens, "seed": seed, "status": "ok"}
    for g_total in (1, 2, 4):
      for g in range(1, g_total + 1):
        depth = g * 4 // g_total
        rows.append(cell | {"run_id": f"d{width}_D{tokens}_G{g_total}_s{seed}", "kind": GRID,
                            "G": g_total, "exit": g, "P": g - 1, "Q": g_total - g,
                            "N_exit_non_embedding": 1000 * depth, "exit_weight": 1 / g_total,
                            "val_loss": noisy(control(depth) * g_total
                                              ** sharing_of_tokens(tokens))})
    for depth in (1, 2, 3):
      rows.append(cell | {"run_id": f"d{width}_D{tokens}_c{depth}_s{seed}", "kind": EXIT_CONTROL,
                          "G": 1, "exit": 1, "P": 0, "Q": 0, "exit_weight": 1.0,
                          "N_exit_non_embedding": 1000 * depth, "val_loss": noisy(control(depth))})
  return pd.DataFrame(rows)


def _log_tokens(tokens):
  return np.log(tokens / np.exp(np.mean(np.log([1e6, 2e6, 4e6, 8e6]))))


def test_gamma_splits_into_size_and_sharing_parts():
  grid = gamma_grid.measure_grid(_grid_with_controls(lambda d: 0.02 + 0.01 * _log_tokens(d)))
  assert len(grid.cells) == 8
  for cell in grid.cells:
    # one design for the three responses: the parts add up to gamma_direct
    assert cell.size.estimate + cell.sharing.estimate == pytest.approx(cell.gamma.estimate,
                                                                       abs=1e-12)
    truth = 0.02 + 0.01 * _log_tokens(cell.D)
    assert cell.sharing.ci95[0] < truth < cell.sharing.ci95[1]
    assert cell.size.estimate > 0.03  # shallower exits: the size part is the controls' slope


def test_gamma_against_tokens_rising_and_levelling_off():
  rising = gamma_grid.measure_grid(_grid_with_controls(lambda d: 0.02 + 0.01 * _log_tokens(d)))
  trend = {t.part: t for t in rising.trends}
  assert set(trend) == {"gamma", "size", "sharing"}
  assert trend["sharing"].slope.ci95[0] < 0.01 < trend["sharing"].slope.ci95[1]
  assert trend["sharing"].curvature.ci95[0] < 0 < trend["sharing"].curvature.ci95[1]
  assert trend["size"].slope.ci95[0] < 0 < trend["size"].slope.ci95[1]
  assert trend["gamma"].d_reference == pytest.approx(np.sqrt(8) * 1e6)
  levelling = gamma_grid.measure_grid(_grid_with_controls(
      lambda d: 0.02 + 0.01 * _log_tokens(d) - 0.01 * _log_tokens(d) ** 2))
  curvature = {t.part: t.curvature for t in levelling.trends}["sharing"]
  assert curvature.ci95[1] < 0 and curvature.ci95[0] < -0.01 < curvature.ci95[1]


def test_the_deepest_exit_tax_is_paired_by_seed():
  """The deepest exit of a G-exit family loses G^sharing(D) times its dense backbone's loss."""
  grid = gamma_grid.measure_grid(_grid_with_controls(lambda d: 0.03))
  assert {(t.G, t.n_seeds) for t in grid.tax} == {(2, 2), (4, 2)}
  assert len(grid.tax) == 2 * 4 * 2  # widths x tokens x G
  for tax in grid.tax:
    truth = tax.G ** 0.03 - 1
    assert tax.ci95[0] < truth < tax.ci95[1]
    assert tax.ratio == pytest.approx(truth, abs=0.006)
