"""The medium study's published records (results/medium) refit to the numbers of its report,
without training, as `experiments.fit --data=results/medium/data/familial.csv` does."""

import json
import types
from pathlib import Path

import pandas as pd
import pytest

from famjax.analysis import gamma_grid, measured_leverage
from famjax.scaling import compare, fit_data, fitting, laws
from famjax.study.config import AnalysisConfig

MEDIUM = Path(__file__).resolve().parents[1] / "results" / "medium"


def test_the_familial_law_refits_to_the_published_report():
  report = json.loads((MEDIUM / "report.json").read_text())
  published = report["laws"]["familial"]
  data = fit_data.validate(pd.read_csv(MEDIUM / "data" / "familial.csv"), laws.FAMILIAL)
  refit = fitting.fit(fitting.Problem.of(laws.FAMILIAL, data))
  natural = laws.to_natural_params(refit.params)
  assert refit.objective == pytest.approx(published["objective"], rel=1e-6)
  for name in ("gamma", "alpha", "beta"):
    assert natural[name] == pytest.approx(published["params"][name], rel=1e-4), name
  assert published["gamma_test"]["p_percentile"] < 0.05


def test_gamma_without_the_law_comes_from_the_published_records():
  report = json.loads((MEDIUM / "report.json").read_text())
  grid = gamma_grid.measure_grid(pd.read_csv(MEDIUM / "data" / "records.csv"))
  assert len(grid.cells) == len(report["gamma_grid"]["cells"]) == 4
  assert grid.shared.estimate == pytest.approx(report["gamma_grid"]["shared"]["estimate"],
                                               rel=1e-9)


def test_measured_leverage_at_the_optimum_comes_from_both_seeds_of_the_records():
  """Every published family's measured EL recomputes from records.csv, and at each leverage
  point the family nearest the fitted N*(C) has both seeds and a t interval around their mean."""
  report = json.loads((MEDIUM / "report.json").read_text())
  frame = pd.read_csv(MEDIUM / "data" / "records.csv")
  entries = measured_leverage.measured(frame, AnalysisConfig())
  published = {e["family"]: e["measured"] for e in report["measured_leverage"]}
  assert {e.family: e.measured for e in entries} == pytest.approx(published, rel=1e-9)
  optimal = [types.SimpleNamespace(**o) for o in report["from_law"]["compute_optimal"]]
  at_optimum = measured_leverage.at_optimum(entries, optimal)
  assert {e["G"] for e in report["leverage_at_optimum"]} == {2, 4}
  for entry, again in zip(report["leverage_at_optimum"], at_optimum, strict=True):
    assert entry["families"] == again.families and len(again.families) == 2
    assert entry["ci95"] == pytest.approx(again.ci95, rel=1e-9)
    lo, hi = entry["ci95"]
    assert 1 < lo < entry["mean"] < hi


@pytest.mark.slow
def test_the_law_ranking_recomputes_from_the_published_records():
  """results/medium/compare.json (`experiments.fit --data=results/medium/data/familial.csv
  --compare=paper,gamma_d,submodel,a_penalty,size_only --bootstrap=1000`): the ranking, every
  law's held-out errors and objective, and the ranking's confidence (which needs no refits)."""
  published = json.loads((MEDIUM / "compare.json").read_text())
  frame = pd.read_csv(MEDIUM / "data" / "familial.csv")
  columns = {**fit_data.validate(frame, laws.FAMILIAL), "C": frame["C"].to_numpy(float)}
  again = compare.compare({name: laws.CANDIDATES[name] for name in published["laws"]}, columns,
                          n_bootstrap=0).summary()
  assert list(again["laws"]) == list(published["laws"]) and again["best"] == "gamma_d"
  for name, law in published["laws"].items():
    assert again["laws"][name]["objective"] == pytest.approx(law["objective"], rel=1e-6), name
    for scheme, held in law["held_out"].items():
      got = again["laws"][name]["held_out"][scheme]
      assert got["mean_abs"] == pytest.approx(held["mean_abs"], rel=1e-4), (name, scheme)
  assert again["confidence"]["best_share"] == pytest.approx(
      published["confidence"]["best_share"], abs=0.01)


LAWS = MEDIUM.parent / "laws"


def _laws_study():
  return (json.loads((LAWS / "report.json").read_text()),
          pd.read_csv(LAWS / "data" / "records.csv"))


def test_the_laws_grid_spans_16x_in_tokens_and_its_tax_and_trends_recompute():
  """results/laws (`experiments.isoflop --config=laws`): the gamma
  grid's four token counts and two widths, and every cell's parts, trend and tax from records."""
  report, frame = _laws_study()
  grid = gamma_grid.measure_grid(frame)
  tokens = sorted({cell.D for cell in grid.cells})
  assert len(tokens) >= 4 and tokens[-1] / tokens[0] >= 16
  assert {cell.d_model for cell in grid.cells} == {32, 48}
  published = report["gamma_grid"]
  for cell, again in zip(published["cells"], grid.cells, strict=True):
    for part in ("gamma", "size", "sharing"):
      assert getattr(again, part).estimate == pytest.approx(cell[part]["estimate"], rel=1e-9)
  assert [t.part for t in grid.trends] == [t["part"] for t in published["trends"]]
  for trend, again in zip(published["trends"], grid.trends, strict=True):
    assert again.slope.ci95 == pytest.approx(trend["slope"]["ci95"], rel=1e-9)
    assert again.curvature.ci95 == pytest.approx(trend["curvature"]["ci95"], rel=1e-9)
  assert len(grid.tax) == len(published["tax"]) == 2 * len(tokens) * 2
  for tax, again in zip(published["tax"], grid.tax, strict=True):
    assert (again.d_model, again.D, again.G) == (tax["d_model"], tax["D"], tax["G"])
    assert again.ratio == pytest.approx(tax["ratio"], rel=1e-9)
    assert again.ci95 == pytest.approx(tax["ci95"], rel=1e-9)


def test_the_laws_placements_and_validation_noise_recompute():
  """Six exit placements over three seeds: the branch terms and the one-exponent model with the
  same two-stage bootstrap (its seed and size from the report), and the validation noise."""
  from famjax.analysis import placements
  report, frame = _laws_study()
  published = report["placements"]
  again = placements.measure_placements(frame, "val", published["n_bootstrap"],
                             report["options"]["seed"])
  assert again.n_families == published["n_families"] == 6 * 3
  for name in ("alpha_b", "beta_b", "one_exponent"):
    assert getattr(again, name).estimate == pytest.approx(published[name]["estimate"], rel=1e-9)
    assert getattr(again, name).ci95 == pytest.approx(published[name]["ci95"], rel=1e-9)
  noise = report["validation_noise"]
  assert noise["n_exits"] == len(frame[frame["status"] == "ok"])
  ok = frame[frame["status"] == "ok"]
  gap = (ok["val_loss_first_half"] - ok["val_loss_second_half"]) / ok["val_loss"]
  assert noise["relative_se"] == pytest.approx(float((gap ** 2).mean() ** 0.5 / 2), rel=1e-9)
