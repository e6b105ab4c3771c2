"""The loss-to-accuracy link: recovery of a known sigmoid, bootstrap intervals over runs, and
the held-out checks, on synthetic studies whose accuracies are binomial draws."""

import numpy as np
import pytest

from famjax.evaluation import accuracy_link

TRUE = accuracy_link.Link(floor=0.25, ceiling=0.9, midpoint=2.0, slope=4.0)
DOCS = 200  # questions per task: the binomial noise of each measured accuracy


def synthetic_points(seed=0, runs=30, truth=TRUE):
  """Three exits per run at losses in [1.2, 3.2], accuracies drawn as a task of DOCS questions."""
  rng = np.random.default_rng(seed)
  run = np.repeat(np.arange(runs), 3)
  loss = rng.uniform(1.2, 3.2, run.size)
  accuracy = rng.binomial(DOCS, truth.accuracy(loss)) / DOCS
  stderr = np.sqrt(accuracy * (1 - accuracy) / DOCS)
  return {"loss": loss, "accuracy": accuracy, "run": run, "stderr": stderr}


def test_the_link_is_recovered_and_its_intervals_cover_the_truth():
  points = synthetic_points()
  boot = accuracy_link.bootstrap(points["loss"], points["accuracy"], points["run"], n=300)
  intervals = boot.intervals()
  for name in accuracy_link.PARAMS:
    low, high = intervals[name]
    assert low <= getattr(TRUE, name) <= high, (name, intervals[name])
  assert boot.link.midpoint == pytest.approx(2.0, abs=0.05)
  assert boot.samples.shape == (300, 4)
  low, high = boot.accuracy_band(np.array([1.5, 2.0, 2.5]))
  assert np.all(low < TRUE.accuracy([1.5, 2.0, 2.5]) + 0.02)
  assert np.all(high > TRUE.accuracy([1.5, 2.0, 2.5]) - 0.02)


def test_the_link_decreases_with_loss_and_stays_within_its_floor_and_ceiling():
  points = synthetic_points(seed=3)
  fitted = accuracy_link.fit(points["loss"], points["accuracy"])
  curve = fitted.accuracy(np.linspace(-10, 20, 200))
  assert np.all(np.diff(curve) <= 0)
  assert 0.0 <= fitted.floor <= curve.min() and curve.max() <= fitted.ceiling <= 1.0


def test_a_fixed_floor_is_kept():
  points = synthetic_points(seed=1)
  fitted = accuracy_link.fit(points["loss"], points["accuracy"], floor=0.25)
  assert fitted.floor == 0.25 and fitted.midpoint == pytest.approx(2.0, abs=0.06)


def test_bad_input_is_an_error_naming_it():
  with pytest.raises(ValueError, match="at least 4"):
    accuracy_link.fit([1.0, 2.0], [0.5, 0.4])
  with pytest.raises(ValueError, match=r"floor must be in \[0, 1\)"):
    accuracy_link.fit([1.0, 2.0, 3.0, 4.0], [0.9, 0.5, 0.3, 0.3], floor=1.5)


def test_the_bootstrap_draws_whole_runs():
  """A run's exits sit close together in loss and share the run's error (an offset per run):
  drawing whole runs, as the bootstrap does, gives wider intervals than drawing exits as if
  they were independent points."""
  rng = np.random.default_rng(5)
  run = np.repeat(np.arange(20), 3)
  loss = rng.uniform(1.2, 3.0, 20)[run] + np.tile([0.2, 0.1, 0.0], 20)
  accuracy = np.clip(rng.binomial(DOCS, TRUE.accuracy(loss)) / DOCS
                     + rng.normal(0, 0.05, 20)[run], 0, 1)
  by_run = accuracy_link.bootstrap(loss, accuracy, run, n=300).intervals()
  by_exit = accuracy_link.bootstrap(loss, accuracy, np.arange(run.size), n=300).intervals()
  width = lambda intervals: intervals["midpoint"][1] - intervals["midpoint"][0]
  assert width(by_run) > 1.2 * width(by_exit)


def test_held_out_runs_are_predicted_better_than_by_the_mean_and_within_the_interval():
  points = synthetic_points(seed=2)
  held = np.isin(points["run"], np.random.default_rng(0).choice(30, 10, replace=False))
  out = accuracy_link.held_out(points, held)
  assert out["n"] == 30 and out["runs"] == 10
  assert out["mae"] < out["baseline_mae"] / 4
  assert out["coverage95"] >= 0.85
  loo = accuracy_link.leave_one_run_out(points, accuracy_link.fit(points["loss"],
                                                                  points["accuracy"]))
  assert loo["runs"] == 30 and loo["mae"] < loo["baseline_mae"] / 4


def test_extrapolating_to_lower_losses_keeps_skill_and_widens_the_band():
  """The strongest exits held out (as a larger budget's would be): the link still beats the
  mean, and its band is wider there than within the fitted losses."""
  points = synthetic_points(seed=2)
  strongest = points["loss"] < 1.7
  out = accuracy_link.held_out(points, strongest)
  assert out["mae"] < out["baseline_mae"] / 2
  boot = accuracy_link.bootstrap(points["loss"][~strongest], points["accuracy"][~strongest],
                        points["run"][~strongest], n=200)
  low, high = boot.accuracy_band(np.array([1.3, 2.5]))
  assert high[0] - low[0] > 2 * (high[1] - low[1])


def test_a_link_where_accuracy_ignores_loss_has_no_skill():
  """Flat accuracy: the held-out error is no better than the mean's (the check does not flatter)."""
  points = synthetic_points(seed=4, truth=accuracy_link.Link(0.5, 0.5, 2.0, 1.0))
  fitted = accuracy_link.fit(points["loss"], points["accuracy"])
  loo = accuracy_link.leave_one_run_out(points, fitted)
  assert loo["mae"] > 0.9 * loo["baseline_mae"]


@pytest.mark.slow
def test_bootstrap_intervals_cover_at_about_their_level():
  """Over 40 synthetic studies the midpoint's 95% interval holds the truth in at least 85%."""
  covered = 0
  for seed in range(40):
    points = synthetic_points(seed=100 + seed, runs=20)
    low, high = accuracy_link.bootstrap(points["loss"], points["accuracy"], points["run"], n=200,
                               seed=seed).intervals()["midpoint"]
    covered += low <= TRUE.midpoint <= high
  assert covered >= 34, covered
