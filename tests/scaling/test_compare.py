"""The familial laws a comparison ranks (closed forms, registry, input checks) and the comparison
itself: held-out errors, the penalised fit, the ranking and its confidence, the command line."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

from famjax.scaling import compare, fit_data, fitting, laws
from famjax.study import config

from conftest import PAPER

GAMMA_SLOPE = 0.03  # gamma rising with log tokens, as the medium study's direct gamma does


def _design(seed=0, noise=0.0, law=laws.GAMMA_D, params=None):
  """Two seeds of an IsoFLOP-like design over N, D and G, with the budget C of each row."""
  n, d, g = np.meshgrid(np.geomspace(3e7, 3e9, 4), np.geomspace(1e9, 1e11, 3), [1.0, 2.0, 4.0])
  one = {"N": n.ravel(), "D": d.ravel(), "G": g.ravel()}
  columns = {k: np.tile(v, 2) for k, v in one.items()}
  columns["C"] = 6 * columns["N"] * columns["D"]
  params = params or {**PAPER, "gamma_slope": GAMMA_SLOPE}
  with jax.enable_x64(True):
    clean = np.asarray(laws.loss(law, params, fitting.as_data(columns)))
  rng = np.random.default_rng(seed)
  columns["loss"] = clean * np.exp(noise * rng.standard_normal(clean.shape))
  return columns


def test_the_candidate_laws_match_their_closed_forms():
  n, d, g = np.array([1e8, 3e8, 1e9]), np.array([1e10, 3e10, 1e9]), np.array([1.0, 3.0, 4.0])
  nat = laws.PAPER_FAMILIAL
  e, a, b, alpha, beta, gamma = (nat[k] for k in ("E", "A", "B", "alpha", "beta", "gamma"))
  data_term = b / d ** beta
  exits = [np.arange(1, k + 1) / k * n_i for k, n_i in zip(g.astype(int), n)]
  size_only = np.array([np.mean(e + a / n_g ** alpha) for n_g in exits]) + data_term
  slope = 0.02
  expected = {
      "size_only": size_only,
      "submodel": size_only * g ** gamma,
      "a_penalty": e + a * g ** gamma / n ** alpha + data_term,
      "gamma_d": (e + a / n ** alpha + data_term) * g ** (gamma + slope * np.log(d / 1e6)),
      "paper": (e + a / n ** alpha + data_term) * g ** gamma,
  }
  with jax.enable_x64(True):
    data = fitting.as_data({"N": n, "D": d, "G": g})
    for name, law in laws.CANDIDATES.items():
      got = laws.loss(law, {**PAPER, "gamma_slope": slope}, data)
      np.testing.assert_allclose(got, expected[name], rtol=1e-12, err_msg=name)


def test_the_registry_names_the_laws_the_study_config_accepts():
  assert tuple(laws.CANDIDATES) == config.COMPARE_LAWS
  assert laws.CANDIDATES["paper"] is laws.FAMILIAL
  for law in laws.CANDIDATES.values():  # every law's starts cover its parameters
    assert set(law.starts(450)) == set(law.param_names)
  with pytest.raises(ValueError, match="study.compare_laws"):
    config.AnalysisConfig(compare_laws=("paper", "chinchilla"))
  with pytest.raises(ValueError, match="study.compare_laws"):
    config.AnalysisConfig(compare_laws=("paper",))
  assert config.AnalysisConfig(compare_laws=()).compare_laws == ()


def test_exit_size_laws_refuse_more_exits_than_they_sum_over():
  frame = pd.DataFrame(_design(noise=0.01))
  frame.loc[3, "G"] = laws.MAX_EXITS + 1
  with pytest.raises(ValueError, match=r"size_only law sums over at most 64 exits.*rows \[3\]"):
    fit_data.validate(frame, laws.SIZE_ONLY)
  fit_data.validate(frame, laws.FAMILIAL)  # the paper's law takes any G


def test_laplace_aic_charges_two_per_parameter():
  delta, n = 1e-3, 50
  objective = n * delta * 0.02  # mean |residual| 2%
  assert compare.laplace_aic(objective, n, 6, delta) == pytest.approx(2 * n * np.log(0.02) + 12)
  assert (compare.laplace_aic(objective, n, 7, delta)
          - compare.laplace_aic(objective, n, 6, delta)) == pytest.approx(2)


def test_held_out_rows_are_predicted_by_a_fit_that_never_saw_them():
  """Noise-free rows of gamma_d: its held-out predictions are exact; the paper's law, which has
  no way to make gamma grow with D, misses the held-out budget's rows, most at the largest G."""
  columns = _design()
  data = {k: columns[k] for k in ("N", "D", "G", "loss")}
  labels = compare._fold_labels(columns, "configuration")
  assert np.unique(labels).size == 36  # 4 N x 3 D x 3 G; two seeds per configuration
  exact = fitting.fit(fitting.Problem.of(laws.GAMMA_D, data), starts=laws.GAMMA_D.starts(45))
  held = compare.held_out(exact, labels, "configuration")
  assert held.n_folds == 36 and held.max_abs < 1e-4
  paper = fitting.fit(fitting.Problem.of(laws.FAMILIAL, data), starts=laws.FAMILIAL.starts(45))
  by_d = compare.held_out(paper, columns["D"], "budget")
  assert by_d.mean_abs > 20 * held.mean_abs
  bias = by_d.bias_by_G(columns["G"])
  assert abs(bias[4]) > abs(bias[1])


def test_a_held_out_fold_keeps_its_whole_perturbation():
  """One configuration's rows raised 5% above noise-free gamma_d rows: refitted without them, the
  law predicts the truth there, so their held-out error is the whole perturbation, 1/1.05 - 1. The
  full fit, which saw them, bends toward them (4e-4 here, Huber-robust as it is): a refit that
  kept the fold's own rows would predict that, not the truth."""
  columns = _design()
  data = {k: columns[k] for k in ("N", "D", "G", "loss")}
  labels = compare._fold_labels(columns, "configuration")
  fold = labels == labels[35]  # the largest N, D and G
  data["loss"] = np.where(fold, data["loss"] * 1.05, data["loss"])
  result = fitting.fit(fitting.Problem.of(laws.GAMMA_D, data), starts=laws.GAMMA_D.starts(45))
  held = compare.held_out(result, labels, "configuration")
  whole = 1 / 1.05 - 1
  np.testing.assert_allclose(held.error_R[fold], whole, atol=1e-8)
  with jax.enable_x64(True):
    in_sample = np.asarray(laws.loss(laws.GAMMA_D, result.params, fitting.as_data(data)))
  assert np.all(in_sample[fold] / data["loss"][fold] - 1 - whole > 1e-4)  # the data tell them apart


@pytest.fixture(scope="module")
def comparison():
  columns = _design(seed=1, noise=0.002)
  return columns, compare.compare({"paper": laws.FAMILIAL, "gamma_d": laws.GAMMA_D}, columns,
                                  n_bootstrap=0, starts_every=45)


@pytest.mark.fp_path
def test_the_law_that_made_the_data_ranks_first_and_surely(comparison):
  columns, result = comparison
  assert result.ranked_by == "budget" and result.best.name == "gamma_d"
  assert [c.name for c in result.candidates] == ["gamma_d", "paper"]
  assert result.confidence.best_share > 0.95 and result.confidence.margin_ci95[0] > 0
  gamma_d, paper = result.candidates
  assert gamma_d.fitted.result.params["gamma_slope"] == pytest.approx(GAMMA_SLOPE, abs=0.005)
  assert gamma_d.aic < paper.aic
  assert set(gamma_d.held_out) == {"budget", "configuration"}
  assert gamma_d.held_out["budget"].n_folds == np.unique(columns["C"]).size == 11  # 12 N x D,
  # two with the same product


def test_a_comparison_summary_is_json_and_prints_its_ranking(comparison):
  _, result = comparison
  summary = json.loads(json.dumps(result.summary()))
  assert summary["best"] == result.best.name and list(summary["laws"]) == [
      c.name for c in result.candidates]
  law = summary["laws"]["paper"]
  assert law["n_params"] == 6 and set(law["held_out"]["budget"]["bias_by_G"]) == {"1", "2", "4"}
  assert law["fit"]["law"] == "familial"
  text = compare.comparison_table(summary)
  assert "ranked by leave-one-budget-out" in text and f"best: {result.best.name}" in text


def test_laws_fitted_at_once_or_given_rank_as_fitted_one_by_one(comparison, monkeypatch):
  columns, alone = comparison
  given = {"paper": alone.candidates[[c.name for c in alone.candidates].index("paper")].fitted}
  fits = []
  real_fit_law = compare.fitted_law.fit_law
  monkeypatch.setattr(compare.fitted_law, "fit_law",
                      lambda law, *a, **k: fits.append(law.name) or real_fit_law(law, *a, **k))
  together = compare.compare({"paper": laws.FAMILIAL, "gamma_d": laws.GAMMA_D}, columns,
                             n_bootstrap=0, starts_every=45, fitted=given)
  assert fits == ["gamma_d"]  # the given fit is not made again
  assert _untimed(together.summary()) == _untimed(alone.summary())


def _untimed(summary):
  """A summary without its fits' wall times."""
  if isinstance(summary, dict):
    return {k: _untimed(v) for k, v in summary.items() if k != "seconds"}
  return summary


def test_without_three_budgets_laws_are_ranked_by_configurations():
  columns = _design(noise=0.002)
  columns.pop("C")
  result = compare.compare({"paper": laws.FAMILIAL, "size_only": laws.SIZE_ONLY}, columns,
                           n_bootstrap=0, starts_every=45)
  assert result.ranked_by == "configuration"
  assert set(result.best.held_out) == {"configuration"}
  with pytest.raises(ValueError, match="at least one law"):
    compare.compare({}, columns)


@pytest.mark.slow
def test_the_fit_command_compares_laws(tmp_path):
  pd.DataFrame(_design(seed=2, noise=0.002)).to_csv(tmp_path / "runs.csv", index=False)
  root = Path(__file__).resolve().parents[2]
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "experiments.fit", f"--data={tmp_path / 'runs.csv'}",
       f"--out={tmp_path / 'compare.json'}", "--grid_every=45", *args], cwd=root,
      capture_output=True, text=True, timeout=600)
  out = run("--compare=paper,gamma_d,a_penalty", "--bootstrap=100")
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((tmp_path / "compare.json").read_text())
  assert summary["best"] == "gamma_d" and set(summary["laws"]) == {"paper", "gamma_d", "a_penalty"}
  assert len(summary["laws"]["gamma_d"]["fit"]["bootstrap"]["ci95"]["gamma_slope"]) == 2
  assert "best: gamma_d" in out.stdout
  bad = run("--compare=paper,chinchilla")
  assert bad.returncode != 0 and "--compare takes two or more of" in bad.stderr
