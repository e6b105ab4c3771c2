"""A monotone link from an exit's validation loss to its accuracy on a task, fitted across a
study's runs: accuracy = floor + (ceiling - floor) * sigmoid(-slope * (loss - midpoint)), the
sigmoidal loss-to-accuracy form of the task-scaling literature (OLMo's model ladders, Llama 3),
decreasing in loss. Intervals come from a bootstrap over runs (a run's exits are resampled
together, since they share a backbone and its data); how well the link holds is measured on
runs left out of the fit. Plain numpy and scipy: four parameters need no JAX fitter.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit

PARAMS = ("floor", "ceiling", "midpoint", "slope")
Z95 = 1.959964


@dataclasses.dataclass(frozen=True)
class Link:
  """accuracy(loss) = floor + (ceiling - floor) * sigmoid(-slope * (loss - midpoint))."""

  floor: float
  ceiling: float
  midpoint: float
  slope: float

  def accuracy(self, loss_P) -> np.ndarray:
    loss_P = np.asarray(loss_P, np.float64)
    return self.floor + (self.ceiling - self.floor) * expit(-self.slope * (loss_P - self.midpoint))

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _unpack(x, floor: float | None) -> Link:
  """Link from the solver's vector (floor, ceiling share above the floor, midpoint, log slope):
  the bounds then keep 0 <= floor <= ceiling <= 1 and slope > 0."""
  base = x[0] if floor is None else floor
  rest = x[1:] if floor is None else x
  return Link(float(base), float(base + rest[0] * (1.0 - base)), float(rest[1]),
              float(np.exp(rest[2])))


def _solve(loss_P, accuracy_P, start, floor, bounds) -> tuple[Link, float]:
  residual = lambda x: _unpack(x, floor).accuracy(loss_P) - accuracy_P
  result = least_squares(residual, start, bounds=bounds, method="trf")
  return _unpack(result.x, floor), float(result.cost)


def fit(loss_P, accuracy_P, *, floor: float | None = None, start: Link | None = None) -> Link:
  """Least-squares link through (loss, accuracy) points, from a small grid of starts (or from
  `start` alone, as the bootstrap refits do). `floor` fixes the accuracy at infinite loss (the
  task's chance level, when known); otherwise it is fitted in [0, 1]."""
  loss_P, accuracy_P = np.asarray(loss_P, np.float64), np.asarray(accuracy_P, np.float64)
  if loss_P.shape != accuracy_P.shape or loss_P.size < 4:
    raise ValueError(f"a link needs at least 4 (loss, accuracy) points; got {loss_P.size}")
  if floor is not None and not 0.0 <= floor < 1.0:
    raise ValueError(f"link floor must be in [0, 1); got {floor}")
  spread = max(float(np.ptp(loss_P)), 1e-3)
  low = [0.0, 0.0, loss_P.min() - 3 * spread, np.log(1e-2 / spread)]
  high = [1.0, 1.0, loss_P.max() + 3 * spread, np.log(1e3 / spread)]
  if floor is not None:
    low, high = low[1:], high[1:]
  if start is not None:
    top = (start.ceiling - start.floor) / max(1.0 - start.floor, 1e-9)
    starts = [[start.floor, top, start.midpoint, np.log(start.slope)]]
  else:
    starts = [[max(accuracy_P.min() - 0.01, 0.0), 0.9, mid, np.log(k / spread)]
              for mid in np.quantile(loss_P, [0.2, 0.5, 0.8]) for k in (1.0, 4.0, 16.0)]
  best = None
  for x0 in starts:
    x0 = np.clip(x0[1:] if floor is not None else x0, low, high)
    candidate = _solve(loss_P, accuracy_P, x0, floor, (low, high))
    best = candidate if best is None or candidate[1] < best[1] else best
  return best[0]


class Bootstrap(NamedTuple):
  """The point fit and its refits on runs resampled with replacement."""

  link: Link
  samples: np.ndarray  # (n, 4): floor, ceiling, midpoint, slope per resample

  def accuracy_band(self, loss_P, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of the fitted accuracy at each loss."""
    curves = np.stack([Link(*row).accuracy(loss_P) for row in self.samples])
    tail = (1.0 - level) / 2 * 100
    return np.percentile(curves, tail, axis=0), np.percentile(curves, 100 - tail, axis=0)

  def intervals(self, level: float = 0.95) -> dict[str, list[float]]:
    tail = (1.0 - level) / 2 * 100
    return {name: [float(np.percentile(self.samples[:, i], tail)),
                   float(np.percentile(self.samples[:, i], 100 - tail))]
            for i, name in enumerate(PARAMS)}


def bootstrap(loss_P, accuracy_P, run_P, *, n: int = 1000, seed: int = 0,
              floor: float | None = None) -> Bootstrap:
  """The link and `n` refits, each on the runs drawn with replacement (all exits of a drawn run
  come along)."""
  loss_P, accuracy_P, run_P = map(np.asarray, (loss_P, accuracy_P, run_P))
  link = fit(loss_P, accuracy_P, floor=floor)
  runs = np.unique(run_P)
  rows_by_run = [np.flatnonzero(run_P == r) for r in runs]
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(n):
    rows = np.concatenate([rows_by_run[i] for i in rng.integers(0, len(runs), len(runs))])
    if np.unique(loss_P[rows]).size < 4:
      continue
    refit = fit(loss_P[rows], accuracy_P[rows], floor=floor, start=link)
    samples.append([getattr(refit, name) for name in PARAMS])
  return Bootstrap(link, np.asarray(samples, np.float64).reshape(-1, len(PARAMS)))


def errors(predicted_P, measured_P, baseline: float) -> dict:
  """Mean absolute and root-mean-square error, and the mean absolute error of predicting every
  point by `baseline` (the training points' mean accuracy: the link has skill when it beats it)."""
  diff = np.asarray(predicted_P) - np.asarray(measured_P)
  return {"n": int(diff.size), "mae": float(np.mean(np.abs(diff))),
          "rmse": float(np.sqrt(np.mean(diff ** 2))),
          "baseline_mae": float(np.mean(np.abs(baseline - np.asarray(measured_P))))}


def held_out(points, test_P, *, n_bootstrap: int = 200, floor: float | None = None) -> dict:
  """Fit on the points outside `test_P` (a boolean mask), predict those inside: errors, and the
  share of held-out accuracies inside the 95% prediction interval (each side of the fit's
  bootstrap band combined in quadrature with the point's own harness standard error)."""
  test_P = np.asarray(test_P, bool)
  train = {k: np.asarray(v)[~test_P] for k, v in points.items()}
  boot = bootstrap(train["loss"], train["accuracy"], train["run"], n=n_bootstrap, floor=floor)
  loss, measured = np.asarray(points["loss"])[test_P], np.asarray(points["accuracy"])[test_P]
  predicted = boot.link.accuracy(loss)
  low, high = boot.accuracy_band(loss)
  noise = Z95 * np.asarray(points["stderr"])[test_P]
  below = predicted - np.hypot(predicted - low, noise)  # the band is skewed where it
  above = predicted + np.hypot(high - predicted, noise)  # extrapolates: each side on its own
  out = errors(predicted, measured, float(np.mean(train["accuracy"])))
  out["coverage95"] = float(np.mean((below <= measured) & (measured <= above)))
  out["runs"] = int(np.unique(np.asarray(points["run"])[test_P]).size)
  return out


def leave_one_run_out(points, start: Link, floor: float | None = None) -> dict:
  """Each run's exits predicted by the link fitted to every other run."""
  run_P = np.asarray(points["run"])
  loss_P, accuracy_P = np.asarray(points["loss"]), np.asarray(points["accuracy"])
  predicted, baseline = np.empty_like(accuracy_P), np.empty_like(accuracy_P)
  for run in np.unique(run_P):
    inside = run_P == run
    link = fit(loss_P[~inside], accuracy_P[~inside], floor=floor, start=start)
    predicted[inside] = link.accuracy(loss_P[inside])
    baseline[inside] = accuracy_P[~inside].mean()
  diff = predicted - accuracy_P
  return {"n": int(diff.size), "runs": int(np.unique(run_P).size),
          "mae": float(np.mean(np.abs(diff))), "rmse": float(np.sqrt(np.mean(diff ** 2))),
          "baseline_mae": float(np.mean(np.abs(baseline - accuracy_P)))}
